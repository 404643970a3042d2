#!/usr/bin/env bash
# narq's test command: sets up what the tests need (scripts/setup.sh says what it installs),
# then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v cargo >/dev/null || export PATH=$HOME/.cargo/bin:$PATH   # rustup just installed (CI)
cargo test --locked "$@"
