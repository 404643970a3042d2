# The module's assertions on config.services.narq, without nixpkgs (builtins only), so that
# the test suite evaluates them as the module does.
cfg:
let
  inStore = p: builtins.substring 0 (builtins.stringLength builtins.storeDir + 1) (toString p) == builtins.storeDir + "/";
in
[
  {
    assertion = builtins.all (f: !(inStore f)) cfg.secretKeyFiles;
    message = "services.narq.secretKeyFiles must not be in the Nix store (it is world-readable).";
  }
  {
    assertion = cfg.environmentFile == null || !(inStore cfg.environmentFile);
    message = "services.narq.environmentFile must not be in the Nix store.";
  }
  {
    # The daemon runs as its own user and cannot read the root-only secret keys, so it can
    # check signatures only with the public keys given here; without one it refuses to start.
    assertion = cfg.settings.publicKeys != [ ];
    message = "services.narq.settings.publicKeys must list the cache's public key (nix-store --generate-binary-cache-key writes it next to the secret key): the daemon uploads only paths signed by one of these keys.";
  }
]
