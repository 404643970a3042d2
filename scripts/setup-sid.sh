#!/usr/bin/env bash
# Makes the Debian sid chroot whose Nix (Debian's nix-bin, 2.34 at the time of writing) the
# tests and benchmarks run beside the machine's own Nix 2.8. Idempotent: built once, cached
# outside the clone, and says on stderr what it does.
#
# What it may change outside the repository, each announced on stderr when it happens:
#   - Debian package debootstrap, with apt-get, if missing;
#   - /var/cache/narq-test/sid (override: NARQ_SID_DIR): a minbase sid made with debootstrap
#     from the machine's own Debian mirror, then `apt-get install nix-bin` inside it. It is
#     built in a sibling directory and renamed into place only when complete, so an interrupted
#     run leaves nothing that looks finished; `.narq-ready` in it records the Nix version.
# Nothing is mounted outside a private mount namespace, and the chroot's /etc/nix/nix.conf is
# left as Debian ships it: the tests give Nix their settings through NIX_CONF_DIR/NIX_CONFIG.
set -euo pipefail

say() { echo "setup-sid: $*" >&2; }

dir=${NARQ_SID_DIR:-/var/cache/narq-test/sid}
ready=$dir/.narq-ready
if [ -e "$ready" ]; then
    exit 0
fi

mkdir -p "$(dirname "$dir")"
# One builder at a time (several clones may run setup at once); the others wait for it.
exec 9>"$dir.lock"
if ! flock -n 9; then
    say "another setup is building $dir; waiting for it"
    flock 9
fi
[ -e "$ready" ] && exit 0

if ! command -v debootstrap >/dev/null; then
    say "installing Debian package debootstrap (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

sources=/etc/apt/sources.list.d/debian.sources
mirror=${NARQ_SID_MIRROR:-$(awk '/^URIs:/ { print $2; exit }' "$sources" 2>/dev/null || true)}
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian

work=$dir.partial
rm -rf "$work"
say "creating a Debian sid chroot in $dir with debootstrap --variant=minbase from $mirror (a few minutes; log $work.log)"
if ! debootstrap --variant=minbase sid "$work" "$mirror" >"$work.log" 2>&1; then
    say "debootstrap failed; the end of $work.log:"
    tail -n 20 "$work.log" >&2
    exit 1
fi

# Inside: the mirror's sid Release file may be older than this machine's clock, hence
# Check-Valid-Until=false. The chroot runs in a private mount namespace so nothing stays
# mounted on the host.
say "installing nix-bin inside the chroot (apt-get; log $work.log)"
if ! unshare -m --propagation private sh -c '
    set -e
    mount -t proc proc "$1/proc"
    mount --rbind /dev "$1/dev"
    cp /etc/resolv.conf "$1/etc/resolv.conf" 2>/dev/null || true
    chroot "$1" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        sh -c "apt-get -o Acquire::Check-Valid-Until=false update -qq &&
               apt-get install -y -qq --no-install-recommends nix-bin ca-certificates &&
               apt-get clean"
' sh "$work" >>"$work.log" 2>&1; then
    say "installing nix-bin failed; the end of $work.log:"
    tail -n 20 "$work.log" >&2
    exit 1
fi

version=$(unshare -m --propagation private sh -c 'mount -t proc proc "$1/proc"; chroot "$1" nix-store --version' sh "$work")
echo "$version" >"$work/.narq-ready"
rm -rf "$dir"
mv "$work" "$dir"
rm -f "$work.log"
say "sid chroot ready in $dir: $version"
