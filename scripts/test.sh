#!/usr/bin/env bash
# narq's test command: sets up what the tests need (scripts/setup.sh says what it installs),
# then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v cargo >/dev/null || export PATH=$HOME/.cargo/bin:$PATH   # rustup just installed (CI)
# Tests whose prerequisites are missing here (build.rs: nixpkgs' lib, Garage, the Nix 2.34
# chroot, the 64d1f2c binaries) are compiled ignored with the reason "needs …": cargo reports
# them ignored, and this lists them again last, where a person sees them.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --locked "$@" 2>&1 | tee "$log" || status=$?
if grep -q '^test .* \.\.\. ignored, needs ' "$log"; then
    echo "scripts/test.sh: SKIPPED (reported as ignored by cargo), each with what it needs:" >&2
    grep '^test .* \.\.\. ignored, needs ' "$log" | sed 's/^test /  /; s/ \.\.\. ignored, / /' >&2
fi
exit $status
