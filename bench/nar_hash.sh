#!/usr/bin/env bash
# NAR serialisation + SHA-256: narq vs Nix, on the same ~1 GB store path, in one run.
# Adds /usr/lib/x86_64-linux-gnu to the store (once), then times, warm cache:
#   nix-store --dump P | sha256sum     vs     narq nar-hash P
# and checks that both give the same hash.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v hyperfine >/dev/null || {
    echo "bench: installing hyperfine from Debian (apt-get)" >&2
    apt-get update -qq && apt-get install -y -qq hyperfine >/dev/null
}
cargo build --release --locked -q
src=${1:-/usr/lib/x86_64-linux-gnu}
P=$(nix-store --add-fixed --recursive sha256 "$src")
echo "path: $P ($(du -sh "$P" | cut -f1), $(find "$P" | wc -l) files)"
nix_hex=$(nix-store --dump "$P" | sha256sum | cut -d' ' -f1)
ours=$(target/release/narq nar-hash "$P" | cut -d' ' -f1)
[ "$(nix-hash --type sha256 --to-base32 "$nix_hex")" = "$ours" ] || { echo "hash mismatch" >&2; exit 1; }
hyperfine --warmup 1 --runs 5 \
    -n 'nix-store --dump | sha256sum' "nix-store --dump $P | sha256sum" \
    -n 'narq nar-hash' "target/release/narq nar-hash $P"
