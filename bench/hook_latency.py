#!/usr/bin/env python3
"""narq-hook wall time and build-finished -> narinfo-visible latency, against a real daemon.

Builds fresh derivations with real Nix (no hook), starts `narq daemon` on a file:// cache,
then runs `narq-hook` as Nix would (empty OUT_PATHS, DRV_PATH set) and times it:
  - small closure (2 paths, one of them new each run): median and p95 over N runs;
  - a 1,000-path closure: once when all of it is new, then (uploaded) median over 20 runs;
  - latency from starting the hook to the path's narinfo appearing in the cache.
A process that does nothing (/bin/true), timed the same way, is the baseline.
The Nix database is held open by this script while hooks run, as Nix holds it while it runs
post-build-hook (a hook that finds nobody else using it would rebuild SQLite's WAL index).
Hooks run 50 ms apart (a build takes far longer), so each finds the daemon done with the
previous upload; NARQ_BENCH_GAP_MS=0 runs them back to back, against the uploads.
The hook timed is NARQ_BENCH_HOOK, else the static musl build (scripts/build-hook.sh), else
target/release/narq-hook. With NARQ_BENCH_BASELINE_HOOK (e.g. the hook of an older commit),
both hooks are timed in the same run, interleaved (one build each in turn) against the same
daemon, and the ratio is printed: "before and after in one run".
Usage: bench/hook_latency.py [N]   (needs a release build: cargo build --release; the binaries
are taken from $CARGO_TARGET_DIR, else target/)
"""
import json, os, sqlite3, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
BIN = os.path.join(TARGET, "release")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 200
GAP = int(os.environ.get("NARQ_BENCH_GAP_MS", "50")) / 1000
MUSL_HOOK = os.path.join(TARGET, "x86_64-unknown-linux-musl", "release", "narq-hook")
HOOK = os.environ.get("NARQ_BENCH_HOOK") or (MUSL_HOOK if os.path.exists(MUSL_HOOK) else f"{BIN}/narq-hook")
BASELINE = os.environ.get("NARQ_BENCH_BASELINE_HOOK")
HOOKS = [HOOK] + ([BASELINE] if BASELINE else [])


def sh_drv(name, script):
    return ('derivation { name = "%s"; system = builtins.currentSystem; builder = "/bin/sh"; '
            'args = ["-c" %s]; }' % (name, json.dumps(script)))


def nix_build(expr, conf):
    env = dict(os.environ, NIX_CONF_DIR=conf)
    out = subprocess.run(["nix-build", "--no-out-link", "-E", expr], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return out


def deriver(p, conf):
    return subprocess.run(["nix-store", "-q", "--deriver", p], env=dict(os.environ, NIX_CONF_DIR=conf),
                          check=True, capture_output=True, text=True).stdout.strip()


def spawn_time(argv, env):
    t = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env)
    _, status = os.waitpid(pid, 0)
    dt = time.perf_counter() - t
    assert status == 0, argv
    return dt


def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def main():
    tmp = tempfile.mkdtemp(prefix="narq-bench-")
    conf = os.path.join(tmp, "nix")
    os.makedirs(conf)
    with open(os.path.join(conf, "nix.conf"), "w") as f:
        f.write("sandbox = false\nbuild-users-group =\nsubstituters =\nmax-jobs = 8\n")
    stamp = str(time.time_ns())
    runs = N * len(HOOKS)
    print(f"building {runs} + 30 small closures and a 1,000-path closure with Nix ...", flush=True)
    t = time.time()
    base = sh_drv(f"bench-base-{stamp}", "echo base > $out")
    small = nix_build(f"let base = {base}; in builtins.genList (i: "
                      + sh_drv(f"bench-small-${{toString i}}-{stamp}", "echo ${base} ${toString i} > $out")
                      + f") {runs + 30}", conf)
    big = nix_build(f"let leaf = i: " + sh_drv(f"bench-leaf-${{toString i}}-{stamp}", "echo ${toString i} > $out")
                    + "; in " + sh_drv(f"bench-big-{stamp}", "echo ${toString (builtins.genList leaf 999)} > $out"), conf)[0]
    print(f"  built in {time.time() - t:.0f} s", flush=True)
    small_drvs = [deriver(p, conf) for p in small]

    key = os.path.join(tmp, "key.sec")
    subprocess.run([f"{BIN}/narq", "keygen", "bench-1", "--secret-key-file", key,
                    "--public-key-file", os.path.join(tmp, "key.pub")], check=True, capture_output=True)
    cfg = os.path.join(tmp, "config.toml")
    with open(cfg, "w") as f:
        f.write(f'state-dir = "{tmp}/state"\nsocket = "{tmp}/narq.sock"\nsecret-key-files = ["{key}"]\n')
        f.write(f'public-keys = ["{open(os.path.join(tmp, "key.pub")).read().strip()}"]\n')
    env = dict(os.environ, NARQ_CONFIG=cfg)
    daemon = subprocess.Popen([f"{BIN}/narq", "daemon"], env=env, stderr=open(os.path.join(tmp, "daemon.log"), "w"))
    try:
        for _ in range(100):
            if subprocess.run([f"{BIN}/narq", "status"], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(0.05)
        base_env = env
        state = os.environ.get("NIX_STATE_DIR", "/nix/var/nix")
        nix_db = sqlite3.connect(f"file:{state}/db/db.sqlite?mode=ro", uri=True)
        nix_db.execute("SELECT count(*) FROM ValidPaths").fetchall()
        print(f"hook: {HOOK}" + (f"\nbaseline: {BASELINE}" if BASELINE else ""), flush=True)
        true_t = [spawn_time(["/bin/true"], base_env) for _ in range(N)]

        def hook(drv, out_paths="", which=HOOK):
            time.sleep(GAP)
            return spawn_time([which], dict(base_env, OUT_PATHS=out_paths, DRV_PATH=drv))

        # Interleaved: hook i of each binary runs on build i * len(HOOKS) + its index, and
        # which runs first alternates (the first after the gap pays for waking the daemon).
        small_t = {h: [] for h in HOOKS}
        for i in range(N):
            turn = list(enumerate(HOOKS))
            for j, h in (turn if i % 2 == 0 else turn[::-1]):
                small_t[h].append(hook(small_drvs[i * len(HOOKS) + j], which=h))
        hook_t = small_t[HOOK]
        big_drv = deriver(big, conf)
        big_first = hook(big_drv)
        subprocess.run([f"{BIN}/narq", "wait", "--timeout", "600"], env=env, check=True)
        big_runs = {h: [] for h in HOOKS}
        for i in range(20):
            for h in (HOOKS if i % 2 == 0 else HOOKS[::-1]):
                big_runs[h].append(hook(big_drv, which=h))
        big_t = big_runs[HOOK]

        cache = os.path.join(tmp, "state", "cache")
        lat = []
        for p, d in zip(small[runs:], small_drvs[runs:]):
            ni = os.path.join(cache, p[11:43] + ".narinfo")
            t0 = time.perf_counter()
            pid = os.posix_spawn(HOOK, [HOOK], dict(base_env, OUT_PATHS="", DRV_PATH=d))
            deadline = t0 + 10
            while not os.path.exists(ni) and time.perf_counter() < deadline:
                time.sleep(0.0002)
            lat.append(time.perf_counter() - t0)
            os.waitpid(pid, 0)
        ms = lambda x: f"{x * 1000:.2f} ms"
        print(f"/bin/true              median {ms(statistics.median(true_t))}  p95 {ms(q(true_t, .95))}  (n={N})")
        print(f"narq-hook, 2 paths     median {ms(statistics.median(hook_t))}  p95 {ms(q(hook_t, .95))}  (n={N})")
        print(f"narq-hook, 1000 paths  first (all new) {ms(big_first)}; then median {ms(statistics.median(big_t))}  p95 {ms(q(big_t, .95))}  (n=20)")
        print(f"hook -> narinfo        median {ms(statistics.median(lat))}  p95 {ms(q(lat, .95))}  (n=30)")
        if BASELINE:
            b, bb = small_t[BASELINE], big_runs[BASELINE]
            print(f"baseline, 2 paths      median {ms(statistics.median(b))}  p95 {ms(q(b, .95))}  (n={N})"
                  f"  -> this hook / baseline: {statistics.median(hook_t) / statistics.median(b):.2f}")
            print(f"baseline, 1000 paths   median {ms(statistics.median(bb))}  p95 {ms(q(bb, .95))}  (n=20)"
                  f"  -> this hook / baseline: {statistics.median(big_t) / statistics.median(bb):.2f}")
        spooled = os.listdir(os.path.join(tmp, "state", "spool")) if os.path.isdir(os.path.join(tmp, "state", "spool")) else []
        assert not spooled, f"{len(spooled)} requests were spooled: the daemon was too slow"
    finally:
        daemon.terminate()
        daemon.wait()
        subprocess.run(["rm", "-rf", tmp])


if __name__ == "__main__":
    main()
