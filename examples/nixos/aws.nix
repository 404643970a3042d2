# NixOS: upload every build to an AWS S3 bucket.
# flake: inputs.narq.url = "…"; modules = [ narq.nixosModules.default ./aws.nix ];
{ ... }:
{
  services.narq = {
    enable = true;
    settings.store = "s3://my-cache?region=eu-central-1&compression=zstd";
    settings.publicKeys = [ "my-cache-1:REPLACE-WITH-THE-PUBLIC-KEY" ];
    # Made once with: narq keygen my-cache-1 --secret-key-file /etc/nix/my-cache.sec --public-key-file /etc/nix/my-cache.pub
    secretKeyFiles = [ "/etc/nix/my-cache.sec" ];
    # AWS_ACCESS_KEY_ID=… and AWS_SECRET_ACCESS_KEY=…, root-only, not in the Nix store.
    environmentFile = "/etc/narq/aws.env";
  };
}
