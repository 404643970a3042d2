# The module's options (config.services.narq) to narq's config keys, without nixpkgs: the
# module renders it with toml.nix, and the test suite loads the result in `narq daemon`.
cfg: {
  store = cfg.settings.store;
  secret-key-files = map toString cfg.secretKeyFiles;
  public-keys = cfg.settings.publicKeys;
  socket = cfg.settings.socket;
  state-dir = "/var/lib/narq";
  jobs = cfg.settings.jobs;
  upstream = cfg.settings.upstream;
  allowed-users = cfg.settings.allowedUsers;
  # null (the default) leaves the key out.
  metrics-listen = cfg.settings.metricsListen or null;
  # `or`: the tests evaluate this file with settings that predate these options.
  exclude = cfg.settings.exclude or [ ];
  upstream-keys = cfg.settings.upstreamKeys or [ ];
  # A table: `[gc]`. Options not set (or a cfg without them) are left out.
  gc = let g = cfg.gc or { }; in {
    keep-days = g.keepDays or null;
    max-size = g.maxSize or null;
  };
}
