# The systemd units of narq, as NixOS attribute sets, without nixpkgs: the module uses them,
# and the test suite checks them.
{ narq, configFile, socket, stateDirName ? "narq", user ? null, group ? "narq", environmentFile ? null, memoryMax ? "1G", gcDates ? "weekly" }:
let units = {
  socket = {
    description = "narq: the socket narq-hook hands builds to";
    wantedBy = [ "sockets.target" ];
    socketConfig = {
      ListenStream = socket;
      # Only root (the hook, under nix-daemon) and the daemon's group may connect.
      SocketMode = "0660";
      SocketUser = "root";
      SocketGroup = group;
      RemoveOnStop = true;
    };
  };
  service = {
    description = "narq: uploads Nix builds to a binary cache";
    after = [ "network-online.target" ];
    wants = [ "network-online.target" ];
    requires = [ "narq.socket" ];
    environment.NARQ_CONFIG = configFile;
    serviceConfig = {
      Type = "notify";
      NotifyAccess = "main";
      ExecStart = "${narq}/bin/narq daemon --config ${configFile}";
      Restart = "on-failure";
      RestartSec = 2;
      StateDirectory = stateDirName;
      StateDirectoryMode = "0750";
      Group = group;
      UMask = "0027";
      # A hard ceiling: narq's memory is flat (streamed NARs and logs, about 64 MiB per
      # upload), so hitting it is a bug, and must not take the build machine down.
      MemoryMax = memoryMax;
      # Hardening: the daemon reads the store and the Nix logs, writes only its state dir.
      ProtectSystem = "strict";
      ReadOnlyPaths = [ "/nix/store" "/nix/var/log/nix" ];
      ProtectHome = true;
      PrivateTmp = true;
      PrivateDevices = true;
      NoNewPrivileges = true;
      ProtectKernelTunables = true;
      ProtectKernelModules = true;
      ProtectKernelLogs = true;
      ProtectControlGroups = true;
      ProtectClock = true;
      ProtectHostname = true;
      RestrictNamespaces = true;
      RestrictRealtime = true;
      RestrictSUIDSGID = true;
      LockPersonality = true;
      MemoryDenyWriteExecute = true;
      SystemCallArchitectures = "native";
      RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
      CapabilityBoundingSet = "";
    } // (if user == null then { DynamicUser = true; } else { User = user; })
      // (if environmentFile == null then { } else { EnvironmentFile = environmentFile; });
  };
  # `narq gc` on a timer: the daemon's hardening and credentials, as the same user (a
  # DynamicUser of the same name shares the daemon's uid), so that it can use the cache
  # index in the state dir.
  gcService = {
    description = "narq: collects garbage in the binary cache";
    after = [ "network-online.target" ];
    wants = [ "network-online.target" ];
    environment.NARQ_CONFIG = configFile;
    serviceConfig = (builtins.removeAttrs units.service.serviceConfig [ "Type" "NotifyAccess" "ExecStart" "Restart" "RestartSec" ]) // {
      Type = "oneshot";
      ExecStart = "${narq}/bin/narq gc --config ${configFile}";
      User = if user == null then "narq" else user;
      # Deleting is safe to interrupt; a run that takes this long is stuck.
      TimeoutStartSec = "6h";
    };
  };
  gcTimer = {
    description = "narq: collects garbage in the binary cache, ${gcDates}";
    wantedBy = [ "timers.target" ];
    timerConfig = {
      OnCalendar = gcDates;
      Persistent = true;
      RandomizedDelaySec = "1h";
    };
  };
}; in units
