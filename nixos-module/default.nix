# services.narq: every store path this machine builds, uploaded to a signed binary cache.
#
#   services.narq = {
#     enable = true;
#     settings.store = "s3://my-cache?region=eu-central-1";
#     secretKeyFiles = [ "/etc/nix/my-cache.sec" ];
#     settings.publicKeys = [ "my-cache:BASE64..." ];     # the .pub next to it
#     environmentFile = "/etc/narq/aws.env";   # AWS_ACCESS_KEY_ID=… (never in the store)
#   };
{ config, lib, pkgs, ... }:
let
  cfg = config.services.narq;
  inherit (lib) mkOption mkEnableOption mkIf types literalExpression;
  settings = import ./settings.nix cfg;
  configFile = pkgs.writeText "narq.toml" (import ./toml.nix settings);
  units = import ./units.nix {
    narq = cfg.package;
    inherit configFile;
    inherit (cfg.settings) socket;
    inherit (cfg) user group environmentFile memoryMax;
    gcDates = cfg.gc.dates;
  };
in
{
  options.services.narq = {
    enable = mkEnableOption "narq, which uploads every store path this machine builds to a binary cache";
    package = mkOption {
      type = types.package;
      description = "The narq package.";
    };
    secretKeyFiles = mkOption {
      type = types.listOf types.path;
      default = [ ];
      example = [ "/etc/nix/my-cache.sec" ];
      description = ''
        Signing keys (NAME:BASE64, as nix-store --generate-binary-cache-key writes them). Only the
        hook (root) reads them: keep them root-only, and outside the Nix store (a string path).
      '';
    };
    environmentFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/narq/aws.env";
      description = "Environment for the daemon, e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; never in the Nix store.";
    };
    user = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "User the daemon runs as; null for a systemd DynamicUser.";
    };
    memoryMax = mkOption {
      type = types.str;
      default = "1G";
      example = "512M";
      description = "systemd MemoryMax= of the daemon: a ceiling, well above what it uses (memory does not grow with NAR or log size).";
    };
    group = mkOption {
      type = types.str;
      default = "narq";
      description = "Group of the daemon; members may also enqueue over the socket.";
    };
    gc = {
      enable = mkEnableOption "a systemd timer running `narq gc` (closure-aware garbage collection of the cache)";
      dates = mkOption {
        type = types.str;
        default = "weekly";
        example = "daily";
        description = "When `narq gc` runs (systemd OnCalendar= syntax).";
      };
      keepDays = mkOption {
        type = types.ints.unsigned;
        default = 30;
        description = "Keep the closures of roots pushed within this many days (plus pins); `[gc] keep-days`.";
      };
      maxSize = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "500G";
        description = "If what stays is larger, the oldest roots go first (never pins); `[gc] max-size`.";
      };
    };
    settings = {
      store = mkOption {
        type = types.str;
        default = "file:///var/lib/narq/cache";
        example = "s3://my-cache?region=eu-central-1&compression=zstd";
        description = "Where uploads go, in Nix's store-URL syntax (file:// or s3:// with Nix's parameters).";
      };
      publicKeys = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "my-cache:BASE64..." ];
        description = ''
          Public keys (NAME:BASE64) the daemon checks handed-in signatures against; required (an
          assertion), since the daemon cannot read the root-only secret keys. A path is uploaded
          only with a signature by one of these keys.
        '';
      };
      socket = mkOption {
        type = types.str;
        default = "/run/narq/narq.sock";
        description = "The socket the hook hands builds to.";
      };
      jobs = mkOption {
        type = types.ints.between 1 256;
        default = 4;
        description = "Concurrent uploads.";
      };
      upstream = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "https://cache.nixos.org" ];
        description = ''
          Binary caches whose paths are not uploaded again: the daemon asks each for every path
          it is about to upload, which tells them the store path hashes you build. Empty by
          default; `upstreamKeys` skips what came from cache.nixos.org without asking anyone.
        '';
      };
      upstreamKeys = mkOption {
        type = types.listOf types.str;
        default = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
        description = ''
          Keys that upstream caches sign with, as in trusted-public-keys (NAME:BASE64: the
          signature must verify) or by name alone: a path whose local signatures include one
          was substituted from that cache and is not uploaded. Decided locally, no request.
        '';
      };
      exclude = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "*-source" "*.iso" ];
        description = ''
          Globs (`*`, `?`) on store path names (the part after the hash and '-'). A matching
          path is not uploaded, nor is anything that references it (that would break the
          cache's closure); both are reported as excluded in `narq status`.
        '';
      };
      metricsListen = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "127.0.0.1:9464";
        description = ''
          Address and port (IP:PORT) where the daemon serves Prometheus metrics at /metrics; null
          for none. Unauthenticated: keep it on 127.0.0.1 or a private network.
        '';
      };
      allowedUsers = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Users besides root and the daemon who may enqueue.";
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = import ./assertions.nix cfg;
    users.groups.${cfg.group} = { };
    users.users = mkIf (cfg.user != null) {
      ${cfg.user} = { isSystemUser = true; group = cfg.group; };
    };
    # The hook itself, no wrapper: it runs after every build, and a shell would cost more
    # than the hook. It (root, under nix-daemon) and the CLI read the default config path.
    nix.settings.post-build-hook = "${cfg.package}/bin/narq-hook";
    environment.etc."narq/config.toml".source = configFile;
    # Brings the package's man pages and shell completions (share/) along with `narq`.
    environment.systemPackages = [ cfg.package ];
    systemd.sockets.narq = units.socket;
    systemd.services.narq = units.service;
    systemd.services.narq-gc = mkIf cfg.gc.enable units.gcService;
    systemd.timers.narq-gc = mkIf cfg.gc.enable units.gcTimer;
  };
}
