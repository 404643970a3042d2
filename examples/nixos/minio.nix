# NixOS: upload to MinIO, Garage, Ceph RGW or Cloudflare R2 — any S3 API at a custom endpoint.
{ ... }:
{
  services.narq = {
    enable = true;
    # MinIO/Garage on your network (path-style addressing, plain HTTP):
    settings.store = "s3://nix-cache?endpoint=minio.lan:9000&scheme=http&region=us-east-1&compression=zstd";
    # Cloudflare R2:
    #   settings.store = "s3://nix-cache?endpoint=ACCOUNT_ID.r2.cloudflarestorage.com&region=auto";
    # Garage wants its own region name:  …&region=garage
    # Servers that reject the SDK's CRC checksum trailers need checksum=when-required, the
    # default whenever endpoint= is set.
    settings.publicKeys = [ "nix-cache-1:REPLACE-WITH-THE-PUBLIC-KEY" ];
    secretKeyFiles = [ "/etc/nix/nix-cache.sec" ];
    environmentFile = "/etc/narq/s3.env";
    settings.jobs = 8;
  };
}
