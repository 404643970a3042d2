#!/usr/bin/env bash
# Builds `narq` and `narq-hook` of commit 64d1f2c (the collection protocol before issue 18)
# into /var/cache/narq-test/narq-64d1f2c/, for the tests that run those binaries beside the
# new ones on one cache (tests/it/mixed.rs; they say "skipped" when the binaries are missing).
# Idempotent: does nothing when both binaries are there. Run by scripts/setup.sh.
#
# What it changes: /var/cache/narq-test/narq-64d1f2c/ (the two binaries; the sources, from
# `git archive 64d1f2c`, and cargo's target dir are removed once the binaries are in place),
# and cargo's registry cache (~/.cargo/registry) if a crate of that commit's Cargo.lock is
# not there yet. A debug build, as the tests' own binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

rev=64d1f2c
dest=/var/cache/narq-test/narq-$rev
say() { echo "setup-baseline: $*" >&2; }

if [ -x "$dest/narq" ] && [ -x "$dest/narq-hook" ]; then
    exit 0
fi
if ! git cat-file -e "$rev^{commit}" 2>/dev/null; then
    say "commit $rev is not in this clone (a shallow clone?): the tests that run it beside the new binaries will say skipped"
    exit 0
fi
command -v cargo >/dev/null || export PATH=$HOME/.cargo/bin:$PATH

say "building narq and narq-hook of $rev (debug) into $dest, from git archive $rev (takes minutes once)"
work=$dest/build
rm -rf "$work"
mkdir -p "$work/src"
git archive "$rev" | tar -x -C "$work/src"
(cd "$work/src" && CARGO_TARGET_DIR="$work/target" cargo build --locked --quiet --bin narq --bin narq-hook)
for b in narq narq-hook; do
    cp "$work/target/debug/$b" "$dest/.$b.tmp"
    mv "$dest/.$b.tmp" "$dest/$b"
done
rm -rf "$work"
say "built $dest/narq and $dest/narq-hook ($("$dest/narq" --version 2>/dev/null || echo "$rev"))"
