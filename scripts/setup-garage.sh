#!/usr/bin/env bash
# Garage, the distributed S3 server the cluster tests and benchmarks run three of on
# 127.0.0.1: builds it once from crates.io when it is missing. Idempotent; called by
# scripts/setup.sh. Garage is AGPL and used as a test tool only: narq neither links nor ships it.
#
# What it may change outside the repository, announced on stderr when it happens:
#   - /var/cache/narq-test/garage-$GARAGE_VERSION/bin/garage (`cargo install --root`), with its
#     cargo target directory /var/cache/narq-test/garage-target kept for a rebuild;
#   - ~/.cargo/registry: the crates Garage is built from.
# It takes 15-25 minutes on 2 cores, niced, the first time; nothing after that.
set -euo pipefail

GARAGE_VERSION=2.5.0
cache=/var/cache/narq-test
root=$cache/garage-$GARAGE_VERSION
garage=$root/bin/garage

say() { echo "setup: $*" >&2; }

if [ -x "$garage" ]; then
    exit 0
fi
mkdir -p "$cache"
say "building Garage $GARAGE_VERSION (crates.io, AGPL; a test tool) into $root with cargo install, niced: 15-25 minutes on 2 cores, once"
# Another build of the same (a second checkout's set-up) waits for cargo's lock on the
# target directory, then finds the work done.
CARGO_TARGET_DIR=$cache/garage-target nice cargo install --root "$root" "garage@$GARAGE_VERSION" \
    --locked --no-default-features --features bundled-libs,sqlite
"$garage" --version >&2
