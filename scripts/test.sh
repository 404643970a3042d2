#!/usr/bin/env bash
# narq's test command: sets up what the tests need (scripts/setup.sh says what it installs),
# then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v cargo >/dev/null || export PATH=$HOME/.cargo/bin:$PATH   # rustup just installed (CI)
# The NixOS module tests need nixpkgs' lib (build.rs looks for it the same way); without it
# cargo reports them ignored, and this says why, first and last.
lib=${NARQ_NIXPKGS_LIB:-}
d=$PWD
while [ -z "$lib" ] && [ "$d" != / ]; do
    d=$(dirname "$d")
    [ -e "$d/shared/nixpkgs-lib/lib/default.nix" ] && lib=$d/shared/nixpkgs-lib/lib
done
if [ -z "$lib" ]; then
    skipped="scripts/test.sh: SKIPPED the 4 NixOS module tests (nixos::module_*, reported as ignored): no nixpkgs lib (../shared/nixpkgs-lib/lib beside the checkout, or NARQ_NIXPKGS_LIB)"
    echo "$skipped" >&2
    trap 'echo "$skipped" >&2' EXIT
fi
cargo test --locked "$@"
