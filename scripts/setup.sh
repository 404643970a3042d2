#!/usr/bin/env bash
# Installs what narq's tests, demo and benchmarks need on a fresh Debian machine, as root.
# Idempotent: installs only what is missing.
set -euo pipefail

need_apt=()
command -v nix-build >/dev/null || need_apt+=(nix-bin)
command -v sqlite3 >/dev/null || need_apt+=(sqlite3)
command -v systemd-socket-activate >/dev/null || need_apt+=(systemd)
command -v musl-gcc >/dev/null || need_apt+=(musl-tools)   # the static hook (scripts/build-hook.sh)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]} from Debian" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The static hook is built for musl.
musl_target=$(uname -m)-unknown-linux-musl
if ! rustup target list --installed | grep -qx "$musl_target"; then
    echo "setup: adding the Rust target $musl_target" >&2
    rustup target add "$musl_target" >/dev/null
fi

# Debian's nix-bin: builds as root without a sandbox (no nixpkgs; builders are /bin/sh).
mkdir -p /etc/nix
if ! grep -qs '^sandbox *= *false' /etc/nix/nix.conf; then
    echo 'sandbox = false' >> /etc/nix/nix.conf
fi
# Offline machine: do not wait for cache.nixos.org on every build.
if ! grep -qs '^substituters *=' /etc/nix/nix.conf; then
    echo 'substituters =' >> /etc/nix/nix.conf
fi
# The Nix database exists once Nix has run once.
nix-store --init 2>/dev/null || true

# A real S3 server for the S3 tests and benchmarks. Pinned: moto 5.2 answers
# CompleteMultipartUpload with a <CompleteMultipartUploadResponse> root, which real S3 (and
# the AWS SDK for Rust) do not accept; 5.1.22 answers as S3 does.
MOTO_VERSION=5.1.22
if ! python3 -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null \
    || ! command -v moto_server >/dev/null; then
    echo "setup: installing moto[server]==$MOTO_VERSION from PyPI" >&2
    python3 -m pip install -q "moto[server]==$MOTO_VERSION" >/dev/null
fi
