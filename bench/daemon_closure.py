#!/usr/bin/env python3
"""A daemon fed one closure of N paths (issue 22: N = 100,000): its peak RSS, and the hook's
time once the closure is queued.

    bench/daemon_closure.py [N] [--fanout K] [--store file|moto] [--compression xz|zstd|none] [--keep]

Makes N - 1 leaves (`builtins.toFile`, tiny) and a top path that references them all (one
build; the list goes through `passAsFile`), or with `--fanout K` the leaves under middle
paths of K leaves each (`builtins.toFile` too) and the top over those (no path then has more
than max(K, N / K) references, as in a real closure), starts `narq daemon` on a fresh cache (`file://`
by default: the daemon's own cost, not an S3 server's), runs `narq push --wait TOP` (the
daemon takes the closure from the hook's request and uploads it), then runs the hook as Nix
would for the top's derivation 20 times (OUT_PATHS empty, DRV_PATH set: the closure is queued
and uploaded already) and prints: the push's time, the daemon's peak RSS (VmHWM), the hook's
median and p95. Without `--keep` the N paths are deleted from the Nix store afterwards
(`nix-store --delete`, these paths only).

Binaries: $CARGO_TARGET_DIR (else target/)/release, or NARQ_BENCH_BIN=DIR; the hook is
NARQ_BENCH_HOOK if set.
"""
import argparse, os, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("NARQ_BENCH_BIN") or os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "release")
NARQ = os.path.join(BIN, "narq")
HOOK = os.environ.get("NARQ_BENCH_HOOK") or os.path.join(BIN, "narq-hook")


def sh(*argv, env=None):
    return subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", type=int, nargs="?", default=100_000)
    ap.add_argument("--fanout", type=int, default=0, help="leaves per middle path (0: the top references every leaf)")
    ap.add_argument("--store", choices=["file", "moto"], default="file")
    ap.add_argument("--compression", choices=["xz", "zstd", "none"], default="xz",
                    help="of the NARs (xz, Nix's default: its encoder takes ~90 MiB for the top path's 7 MB NAR)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="narq-bench-closure-")
    conf = os.path.join(tmp, "nix-conf")
    os.makedirs(conf)
    with open(os.path.join(conf, "nix.conf"), "w") as f:
        f.write("sandbox = false\nbuild-users-group =\nsubstituters =\n")
    nixenv = dict(os.environ, NIX_CONF_DIR=conf)
    stamp = str(time.time_ns())
    daemon = moto = None
    paths, top, drv = [], None, None
    try:
        t = time.perf_counter()
        expr = os.path.join(tmp, "closure.nix")
        with open(expr, "w") as f:
            if args.fanout:
                mids = max(1, (args.n - 1) // (args.fanout + 1))
                per = (args.n - 1 - mids) // mids
                f.write('let leaf = i: builtins.toFile "scale-%s-${toString i}" (toString i);\n'
                        '    mid = m: builtins.toFile "scale-mid-%s-${toString m}" (toString (builtins.genList (i: leaf (m * %d + i)) %d)); in\n'
                        'derivation { name = "scale-top-%s"; system = builtins.currentSystem; builder = "/bin/sh";\n'
                        '  refs = toString (builtins.genList mid %d); passAsFile = [ "refs" ];\n'
                        '  args = ["-c" "/bin/cat $refsPath > $out"]; }\n' % (stamp, stamp, per, per, stamp, mids))
            else:
                f.write('let leaf = i: builtins.toFile "scale-%s-${toString i}" (toString i); in\n'
                        'derivation { name = "scale-top-%s"; system = builtins.currentSystem; builder = "/bin/sh";\n'
                        '  refs = toString (builtins.genList leaf %d); passAsFile = [ "refs" ];\n'
                        '  args = ["-c" "/bin/cat $refsPath > $out"]; }\n' % (stamp, stamp, args.n - 1))
        top = sh("nix-build", "--no-out-link", expr, env=nixenv).strip()
        drv = sh("nix-store", "-q", "--deriver", top, env=nixenv).strip()
        paths = sh("nix-store", "-qR", top, env=nixenv).split()
        print(f"built a closure of {len(paths)} paths in {time.perf_counter() - t:.0f} s", flush=True)

        key = os.path.join(tmp, "key.sec")
        sh(NARQ, "keygen", "bench-1", "--secret-key-file", key, "--public-key-file", key + ".pub")
        env = dict(os.environ, NIX_CONF_DIR=conf, RUST_LOG="warn")
        if args.store == "moto":
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from local_s3 import Moto
            moto = Moto()
            moto.s3.create_bucket(Bucket="closure")
            store = f"s3://closure?endpoint=127.0.0.1:{moto.port}&scheme=http"
            env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_EC2_METADATA_DISABLED="true")
        else:
            store = f"file://{tmp}/cache"
        store += ("&" if "?" in store else "?") + f"compression={args.compression}"
        cfg = os.path.join(tmp, "narq.toml")
        with open(cfg, "w") as f:
            f.write(f'state-dir = "{tmp}/state"\nsocket = "{tmp}/narq.sock"\nsecret-key-files = ["{key}"]\nstore = "{store}"\n')
        env["NARQ_CONFIG"] = cfg
        daemon = subprocess.Popen([NARQ, "daemon"], env=env, stderr=open(os.path.join(tmp, "daemon.log"), "w"))
        for _ in range(200):
            if subprocess.run([NARQ, "status"], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(0.05)
        load = os.getloadavg()[0]
        t = time.perf_counter()
        sh(NARQ, "push", "--wait", top, env=env)
        push = time.perf_counter() - t
        with open(f"/proc/{daemon.pid}/status") as f:
            peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
        hook_env = dict(env, OUT_PATHS="", DRV_PATH=drv)
        times = []
        for _ in range(20):
            t = time.perf_counter()
            subprocess.run([HOOK], env=hook_env, check=True, capture_output=True)
            times.append(time.perf_counter() - t)
            time.sleep(0.05)
        with open(f"/proc/{daemon.pid}/status") as f:
            peak = max(peak, next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024)
        times.sort()
        shape = f"fan-out {args.fanout}" if args.fanout else "one top over all"
        print(f"{len(paths):,} paths ({shape}) to {args.store} ({args.compression}): narq push --wait {push:.1f} s, daemon peak RSS {peak:.0f} MiB; "
              f"hook once queued: median {statistics.median(times) * 1000:.1f} ms, p95 {times[18] * 1000:.1f} ms; load {load:.1f}", flush=True)
        if os.environ.get("NARQ_BENCH_HOLD"):
            print(f"holding: NARQ_CONFIG={cfg} OUT_PATHS= DRV_PATH={drv}", flush=True)
            time.sleep(float(os.environ["NARQ_BENCH_HOLD"]))
    finally:
        if daemon:
            daemon.terminate()
            daemon.wait()
        if moto:
            moto.stop()
        if paths and not args.keep:
            # The top and its derivation first (they reference the leaves), then the leaves.
            first = [top, drv]
            rest = [p for p in paths if p not in first]
            for batch in [first] + [rest[i:i + 5000] for i in range(0, len(rest), 5000)]:
                subprocess.run(["nix-store", "--delete", *batch], env=nixenv, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
