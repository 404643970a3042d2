#!/usr/bin/env bash
# narq's test command: sets up what the tests need, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --locked "$@"
