#!/usr/bin/env bash
# Builds narq-hook as a static musl binary, without the daemon's dependencies, and prints its
# path. This is the hook to install: it starts in a fraction of the time of a dynamically
# linked glibc binary (no dynamic loader, no glibc CPU probing), and it runs after every build.
# Needs the musl target and musl-gcc (for SQLite's C): scripts/setup.sh installs both.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(uname -m)-unknown-linux-musl
cargo build --release --locked -q --no-default-features --bin narq-hook --target "$target"
echo "$PWD/target/$target/release/narq-hook"
