# The systemd units of narq, as NixOS attribute sets, without nixpkgs: the module uses them,
# and the test suite checks them.
{ narq, configFile, socket, stateDirName ? "narq", user ? null, group ? "narq", environmentFile ? null, memoryMax ? "1G" }:
{
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
}
