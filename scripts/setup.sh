#!/usr/bin/env bash
# Installs what narq's tests and benchmarks (or, with --demo, only scripts/demo.sh) need on a
# Debian machine, as root. Idempotent: installs only what is missing, and says what it installs.
#
# What it may change outside the repository, each announced on stderr when it happens:
#   - Debian packages, with apt-get: nix-bin, musl-tools (the static hook), sqlite3 and systemd
#     (the tests), time (peak RSS in the scale test and benches), python3 and python3-venv (only if missing), curl (only on CI, for rustup);
#   - the Rust target <arch>-unknown-linux-musl, with rustup (under ~/.rustup); on CI (CI=true)
#     without cargo, rustup itself (~/.rustup, ~/.cargo);
#   - Nix's database (/nix/var/nix/db), created by `nix-store --init` if it does not exist;
#   - for the tests, once, under /var/cache/narq-test: a Debian sid chroot with Nix 2.34
#     (scripts/setup-sid.sh), Garage 2.5.0 (scripts/setup-garage.sh, cargo install) and narq
#     64d1f2c's binaries (scripts/setup-baseline.sh).
# It never edits /etc/nix/nix.conf (the tests and the demo give Nix their settings through a
# private NIX_CONF_DIR) and never installs into the system Python: moto goes into a virtual
# environment in .venv/ under the repository, where the tests and benchmarks look for it.
set -euo pipefail
cd "$(dirname "$0")/.."

demo_only=false
case "${1:-}" in
    "") ;;
    --demo) demo_only=true ;;
    *) echo "usage: scripts/setup.sh [--demo]" >&2; exit 2 ;;
esac

say() { echo "setup: $*" >&2; }

need_apt=()
command -v nix-build >/dev/null || need_apt+=(nix-bin)
command -v musl-gcc >/dev/null || need_apt+=(musl-tools)   # the static hook (scripts/build-hook.sh)
if ! $demo_only; then
    command -v sqlite3 >/dev/null || need_apt+=(sqlite3)
    [ -x /usr/bin/time ] || need_apt+=(time)   # GNU time: the scale test's and the benches' peak RSS
    command -v systemd-socket-activate >/dev/null || need_apt+=(systemd)
    if ! command -v python3 >/dev/null; then
        need_apt+=(python3 python3-venv)
    elif ! python3 -c 'import ensurepip' 2>/dev/null; then
        need_apt+=(python3-venv)   # Debian ships `python3 -m venv` without ensurepip
    fi
fi
if ! command -v cargo >/dev/null && [ "${CI:-}" = true ] && ! command -v curl >/dev/null; then
    need_apt+=(curl ca-certificates)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    say "installing Debian packages: ${need_apt[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Rust: CI machines start without it; elsewhere installing a toolchain is the user's choice.
if ! command -v cargo >/dev/null; then
    if [ "${CI:-}" = true ] && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
        say "installing Rust (rustup, stable, minimal profile) into $HOME/.rustup and $HOME/.cargo"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y -q --profile minimal >/dev/null
    fi
    [ -x "$HOME/.cargo/bin/cargo" ] || { say "cargo not found: install Rust (https://rustup.rs), then run this again"; exit 1; }
    export PATH=$HOME/.cargo/bin:$PATH
fi

# The static hook is built for musl.
command -v rustup >/dev/null || { say "rustup not found: it adds the musl target the static hook needs (https://rustup.rs)"; exit 1; }
musl_target=$(uname -m)-unknown-linux-musl
if ! rustup target list --installed | grep -qx "$musl_target"; then
    say "adding the Rust target $musl_target (rustup)"
    rustup target add "$musl_target" >/dev/null
fi

# The Nix database exists once Nix has run once; the hook and the tests read it directly.
# Nix's settings come from an empty private directory, not from /etc/nix/nix.conf.
nix_db=${NIX_STATE_DIR:-/nix/var/nix}/db/db.sqlite
if [ ! -e "$nix_db" ]; then
    say "creating Nix's database ($nix_db) with nix-store --init"
    conf=$(mktemp -d)
    NIX_CONF_DIR=$conf nix-store --init
    rm -rf "$conf"
fi

if $demo_only; then exit 0; fi

bash scripts/setup-sid.sh   # Nix 2.34 in a Debian sid chroot (/var/cache/narq-test/sid), beside 2.8

# A real S3 server for the S3 tests and benchmarks, in a virtual environment under the repo.
# Pinned: moto 5.2 answers CompleteMultipartUpload with a <CompleteMultipartUploadResponse>
# root, which real S3 (and the AWS SDK for Rust) do not accept; 5.1.22 answers as S3 does.
MOTO_VERSION=5.1.22
venv=$PWD/.venv
if ! "$venv/bin/python" -c "import boto3, moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null \
    || [ ! -x "$venv/bin/moto_server" ]; then
    if ! "$venv/bin/python" -c '' 2>/dev/null; then
        say "creating a Python virtual environment in $venv ($(python3 --version))"
        rm -rf "$venv"
        python3 -m venv "$venv"
    fi
    say "installing moto[server]==$MOTO_VERSION from PyPI into $venv"
    # No pip cache: nothing written to ~/.cache.
    "$venv/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check "moto[server]==$MOTO_VERSION" >/dev/null
fi

scripts/setup-garage.sh   # Garage, for the cluster tests (a one-time build, cached outside the clone)
scripts/setup-baseline.sh   # the 64d1f2c binaries, which the mixed-version tests run beside the new ones (cached likewise)
