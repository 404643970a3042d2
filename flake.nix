{
  description = "narq: every store path Nix builds, uploaded in the background to a signed binary cache";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAll (pkgs: rec {
        # The hook runs after every build: linked statically against musl and without the
        # daemon's dependencies, it starts in a fraction of the time (docs/performance.md, the hook).
        narq-hook = pkgs.pkgsStatic.rustPlatform.buildRustPackage {
          pname = "narq-hook";
          version = "0.1.0";
          src = self;
          cargoLock.lockFile = ./Cargo.lock;
          buildNoDefaultFeatures = true;
          cargoBuildFlags = [ "--bin" "narq-hook" ];
          doCheck = false;
        };
        default = pkgs.rustPlatform.buildRustPackage {
          pname = "narq";
          version = "0.1.0";
          src = self;
          cargoLock.lockFile = ./Cargo.lock;
          # The integration tests need root, a Nix store and an S3 server: run them with
          # scripts/test.sh, not in the sandbox.
          doCheck = false;
          nativeBuildInputs = [ pkgs.installShellFiles ];
          postInstall = ''
            ln -sf ${narq-hook}/bin/narq-hook $out/bin/narq-hook
          '' + pkgs.lib.optionalString (pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform) ''
            # Completions and man pages come from the CLI's own definition (hidden commands).
            installShellCompletion --cmd narq \
              --bash <($out/bin/narq completions bash) \
              --fish <($out/bin/narq completions fish) \
              --zsh <($out/bin/narq completions zsh)
            mandir=$(mktemp -d)
            $out/bin/narq man "$mandir"
            installManPage "$mandir"/*.1
          '';
          meta.mainProgram = "narq";
        };
      });

      nixosModules.default = { pkgs, lib, ... }: {
        imports = [ ./nixos-module ];
        services.narq.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };

      # nix build .#checks.x86_64-linux.vm-test -L
      # A builder with services.narq uploading to MinIO; a second machine substitutes from it.
      checks = forAll (pkgs: {
        vm-test = pkgs.testers.runNixOSTest {
          name = "narq";
          nodes.s3 = { ... }: {
            services.minio = { enable = true; rootCredentialsFile = pkgs.writeText "minio-creds" "MINIO_ROOT_USER=narqtest\nMINIO_ROOT_PASSWORD=narqtest123\n"; };
            networking.firewall.allowedTCPPorts = [ 9000 ];
            environment.systemPackages = [ pkgs.minio-client ];
          };
          nodes.builder = { ... }: {
            imports = [ self.nixosModules.default ];
            services.narq = {
              enable = true;
              secretKeyFiles = [ "/etc/narq/test.sec" ];
              environmentFile = "/etc/narq/aws.env";
              settings.store = "s3://cache?endpoint=s3:9000&scheme=http&region=us-east-1";
              settings.upstream = [ ];
              settings.publicKeys = [ "test-1:1NO7wAz2TjFyhuFPoIQANVo8GKpif+YDXJ8q8hbDyeA=" ];
            };
            # A throwaway key pair for this test only (the module requires publicKeys).
            environment.etc."narq/test.sec" = { mode = "0600"; text = "test-1:HZ7o+Bf6ciutBEveVxkdfqL4+0oDzQr/9mBQRZYDQXXU07vADPZOMXKG4U+ghAA1WjwYqmJ/5gNcnyryFsPJ4A=="; };
            environment.etc."narq/aws.env".text = "AWS_ACCESS_KEY_ID=narqtest\nAWS_SECRET_ACCESS_KEY=narqtest123\n";
            nix.settings.substituters = pkgs.lib.mkForce [ ];
          };
          nodes.client = { ... }: { nix.settings.substituters = pkgs.lib.mkForce [ ]; };
          testScript = ''
            s3.wait_for_unit("minio.service")
            s3.wait_for_open_port(9000)
            s3.succeed("mc alias set local http://localhost:9000 narqtest narqtest123")
            s3.succeed("mc mb local/cache && mc anonymous set download local/cache")
            builder.wait_for_unit("narq.socket")
            out = builder.succeed("""nix-build --no-out-link -E 'derivation { name = "hello-narq"; system = builtins.currentSystem;
                builder = "/bin/sh"; args = ["-c" "echo hello > $out"]; }'""").strip()
            builder.succeed("narq wait --timeout 120")
            builder.succeed("journalctl -u narq | grep -q 'uploaded %s'" % out)
            key = "test-1:1NO7wAz2TjFyhuFPoIQANVo8GKpif+YDXJ8q8hbDyeA="
            client.succeed(f"nix-store -r {out} --option substituters http://s3:9000/cache --option trusted-public-keys '{key}'")
            client.succeed(f"grep -q hello {out}")
          '';
        };
      });
    };
}
