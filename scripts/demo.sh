#!/usr/bin/env bash
# narq's main job on the built-in default, a file:// cache under the state dir: start the
# daemon, build a derivation with narq-hook as Nix's post-build-hook, and show the build
# landing, signed, in the cache and being substituted into a fresh Nix store that trusts only
# the demo key. Each step says what it proved; the last line says whether it all worked.
#
# Outside the repository it writes $NARQ_DEMO_DIR (default /tmp/narq-demo) and adds the two
# small demo paths to /nix/store. Nix's settings come from files in that directory
# (NIX_CONF_DIR), never from /etc/nix/nix.conf. scripts/setup.sh --demo installs what is
# missing (Debian's nix-bin and musl-tools, the Rust musl target), and says so.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
demo=${NARQ_DEMO_DIR:-/tmp/narq-demo}
step=0
elapsed() { local s=$((SECONDS - started)); echo "$((s / 60))m$((s % 60))s"; }
# One line on failure, from the main shell only (set -E passes the trap to subshells).
trap '[ "$BASH_SUBSHELL" -gt 0 ] || echo "narq demo: FAILED in step $step after $(elapsed) (files in $demo)" >&2' ERR
say() { step=$1; shift; echo; echo "== $step/7 $*"; }
proved() { echo "-> proved: $*"; }

say 1 "set-up: scripts/setup.sh --demo installs only what is missing, and says what"
scripts/setup.sh --demo
command -v cargo >/dev/null || export PATH=$HOME/.cargo/bin:$PATH
target=$(uname -m)-unknown-linux-musl
proved "$(nix-build --version), musl-gcc and the Rust target $target are installed"

say 2 "building narq and the static narq-hook (release builds: 15 CPU-minutes the first time, about 13 minutes on 2 cores; linking narq is silent for minutes)"
cargo build --release --locked
# The static hook the README installs: scripts/build-hook.sh's build, with cargo's progress.
cargo build --release --locked --no-default-features --bin narq-hook --target "$target"
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin=$target_dir/release
hook=$target_dir/$target/release/narq-hook
[ "$(ldd "$hook" 2>&1 | xargs)" = "statically linked" ] || [ "$(ldd "$hook" 2>&1 | xargs)" = "not a dynamic executable" ]
proved "narq and narq-hook build from this checkout; the hook ($hook) is linked statically, without the daemon's dependencies"

say 3 "a key pair, a config with no store = (so the cache is file://<state-dir>/cache), and narq daemon"
if [ -e "$demo" ] && [ ! -e "$demo/.narq-demo" ]; then
    echo "$demo exists and is not a narq demo directory: set NARQ_DEMO_DIR to a new directory" >&2
    false
fi
rm -rf "$demo"
mkdir -p "$demo/nix" "$demo/client-nix"
touch "$demo/.narq-demo"
"$bin/narq" keygen demo-cache-1 --secret-key-file "$demo/key.sec" --public-key-file "$demo/key.pub" >/dev/null
cat > "$demo/config.toml" <<TOML
# No store = …: the default, file://<state-dir>/cache
state-dir = "$demo/state"
socket = "$demo/narq.sock"
secret-key-files = ["$demo/key.sec"]
TOML
export NARQ_CONFIG=$demo/config.toml
# The builder's Nix: root builds without a sandbox (builders are /bin/sh, no nixpkgs), no
# substituters (nothing to download), and narq-hook after every build.
printf 'sandbox = false\nbuild-users-group =\nsubstituters =\npost-build-hook = %s\n' "$hook" > "$demo/nix/nix.conf"
"$bin/narq" daemon 2> "$demo/daemon.log" &
daemon=$!
trap 'kill $daemon 2>/dev/null || true' EXIT
for _ in $(seq 100); do "$bin/narq" status >/dev/null 2>&1 && break; sleep 0.1; done
"$bin/narq" status >/dev/null || { cat "$demo/daemon.log" >&2; false; }
cache=$demo/state/cache
proved "the daemon answers on $demo/narq.sock; the cache is file://$cache"

say 4 "nix-build with post-build-hook = narq-hook (Nix's settings: $demo/nix/nix.conf)"
stamp=$(date +%s%N)
cat > "$demo/hello.nix" <<'NIX'
{ stamp }:
let
  greeting = derivation {
    name = "greeting-${stamp}"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo hello from a narq cache > $out" ];
  };
in derivation {
  name = "hello-${stamp}"; system = builtins.currentSystem; builder = "/bin/sh";
  # Reads the greeting from the store it runs from: run from the client's store, it shows
  # that both paths were substituted there.
  args = [ "-c" ''
    echo '#!/bin/sh' > $out
    echo '/bin/cat "''${0%/*}/${builtins.baseNameOf "${greeting}"}"' >> $out
    /bin/chmod +x $out
  '' ];
}
NIX
out=$(NIX_CONF_DIR=$demo/nix nix-build --no-out-link "$demo/hello.nix" --argstr stamp "$stamp")
proved "Nix built $out (and the greeting it reads), running narq-hook after each build"

say 5 "narq wait: returns once everything handed to the daemon is uploaded"
"$bin/narq" wait --timeout 60
uploaded=$(find "$cache" -maxdepth 1 -name '*.narinfo' | wc -l)
"$bin/narq" status
echo "-- the daemon's log:"
cat "$demo/daemon.log"
proved "the daemon uploaded the whole closure: $uploaded paths"

say 6 "the cache: Nix's binary-cache layout, signed with the demo key"
(cd "$cache" && find . -type f | sort)
narinfo=$cache/${out:11:32}.narinfo
echo "-- $narinfo:"
cat "$narinfo"
key_name=$(cut -d: -f1 "$demo/key.pub")
grep -q "^Sig: $key_name:" "$narinfo"
[ -f "$cache/$(sed -n 's/^URL: //p' "$narinfo")" ]
drv=$(NIX_CONF_DIR=$demo/nix nix-store -q --deriver "$out")
[ -f "$cache/log/${drv#/nix/store/}" ]
proved "$out has its narinfo, its NAR and its build log in the cache, signed by $key_name"

say 7 "substituting into a fresh store that trusts only $key_name, and running the program"
printf 'substituters = file://%s\ntrusted-public-keys = %s\nrequire-sigs = true\nsandbox = false\nbuild-users-group =\n' \
    "$cache" "$(cat "$demo/key.pub")" > "$demo/client-nix/nix.conf"
NIX_CONF_DIR=$demo/client-nix nix-store --store "$demo/client" -r "$out" 2>&1 | { grep -v add-root || true; }
substituted=$(NIX_CONF_DIR=$demo/client-nix nix-store --store "$demo/client" -qR "$out" | wc -l)
said=$("$demo/client$out")
echo "$demo/client$out says: $said"
[ "$said" = "hello from a narq cache" ]
proved "Nix checked narq's signatures and NAR hashes and substituted $substituted paths into $demo/client"

echo
echo "narq demo: OK in $(elapsed): built ${out:44}, uploaded $uploaded paths, substituted them into a fresh store that trusts only $key_name, ran it: \"$said\""
