#!/usr/bin/env bash
# narq's main job on the built-in default, a file:// cache under the state dir:
# start the daemon, build a derivation with narq-hook as Nix's post-build-hook, and show
# the build landing, signed, in the cache and being substituted into a fresh Nix store.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -q
bin=$PWD/target/release
hook=$(scripts/build-hook.sh)   # static (musl): what the README recommends installing

demo=${NARQ_DEMO_DIR:-/tmp/narq-demo}
rm -rf "$demo"; mkdir -p "$demo"
"$bin/narq" keygen demo-cache-1 --secret-key-file "$demo/key.sec" --public-key-file "$demo/key.pub" >/dev/null
cat > "$demo/config.toml" <<TOML
# No store = …: the default, file://<state-dir>/cache
state-dir = "$demo/state"
socket = "$demo/narq.sock"
secret-key-files = ["$demo/key.sec"]
TOML
export NARQ_CONFIG=$demo/config.toml
mkdir -p "$demo/nix"
printf 'sandbox = false\nbuild-users-group =\nsubstituters =\npost-build-hook = %s\n' "$hook" > "$demo/nix/nix.conf"

"$bin/narq" daemon 2> "$demo/daemon.log" &
daemon=$!
trap 'kill $daemon 2>/dev/null || true' EXIT
for _ in $(seq 50); do "$bin/narq" status >/dev/null 2>&1 && break; sleep 0.1; done

echo "== nix-build with post-build-hook = narq-hook"
stamp=$(date +%s%N)
out=$(NIX_CONF_DIR=$demo/nix nix-build --no-out-link -E "
  let greeting = derivation { name = \"greeting-$stamp\"; system = builtins.currentSystem;
        builder = \"/bin/sh\"; args = [\"-c\" \"echo hello from a narq cache > \$out\"]; };
  in derivation { name = \"hello-$stamp\"; system = builtins.currentSystem; builder = \"/bin/sh\";
        args = [\"-c\" \"echo '#!/bin/sh' > \$out; echo \\\"/bin/cat \${greeting}\\\" >> \$out; /bin/chmod +x \$out\"]; }")
echo "built $out"
"$bin/narq" wait --timeout 30
echo; echo "== narq status"; "$bin/narq" status
echo; echo "== the cache ($demo/state/cache)"; (cd "$demo/state/cache" && find . -type f | sort)
echo; echo "== ${out:11:32}.narinfo"; cat "$demo/state/cache/${out:11:32}.narinfo"
echo; echo "== the daemon's log"; cat "$demo/daemon.log"
echo; echo "== substituted into a fresh store that trusts only $(cat "$demo/key.pub" | cut -d: -f1)"
nix-store --store "$demo/client" -r "$out" --option substituters "file://$demo/state/cache" \
    --option trusted-public-keys "$(cat "$demo/key.pub")" 2>&1 | grep -v add-root
echo "running the substituted program:"
"$demo/client$out"
