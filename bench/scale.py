#!/usr/bin/env python3
"""`narq verify` and `narq gc` at the scale of a fleet's cache (issue 22), on a cache
bench/gen_cache.py wrote: time, peak RSS and the calls each run made.

    bench/scale.py CACHE_OUT [--narq BIN] [--label NAME] [--cases verify,gc,gc-real]
                   [--store file|garage] [--json FILE]

CACHE_OUT is gen_cache.py's OUT (OUT/cache, OUT/key.pub). Cases, in this order:
  verify-cold   `narq verify --json` with an empty state dir (every narinfo read);
  verify-warm   the same again (the index holds every narinfo);
  gc-dry        `narq gc --dry-run --json` (warm: it shares verify's index);
  gc-real       `narq gc --json` removing the generations without roots (~10%), on a copy
                (hard links, `file://`) so that the cache stays whole for the next run; its
                index is warmed by a `gc --dry-run` on the copy first (not timed).
With `--store garage` the cache is first uploaded to a 3-node Garage cluster (bench/local_s3.py;
every object is new there, so gc runs with `--grace 0s`); gc-real then comes last and removes
from the bucket itself.

Each line: case, seconds, CPU seconds (user + system: what a loaded machine does not hide), peak RSS (GNU time's), the calls by kind
(`--json`'s `calls`; older narq reports none: then what its `--json` says it read), the
load average before the run. `--narq` names the binary (default target/release/narq), so the
same cache measures two builds; `--json FILE` appends the lines as JSON.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_rss(argv, env, ok=(0,)):
    """Runs argv with its output in files; returns (seconds, peak RSS MiB, stdout, stderr); the
    CPU seconds it used (user + system) are in CPU[0] after. The peak is GNU time's, of a
    process execed from a small one: Linux starts a forked child's peak at its parent's size
    (this script holds hundreds of MiB after an upload to Garage), which wait4 would report."""
    with tempfile.TemporaryFile("w+") as o, tempfile.TemporaryFile("w+") as e, tempfile.NamedTemporaryFile("r") as m:
        t = time.perf_counter()
        p = subprocess.Popen(["/usr/bin/time", "-o", m.name, "-f", "%M %U %S", *argv], env=env, stdout=o, stderr=e)
        p.wait()
        dt = time.perf_counter() - t
        rss_kib, user, system = m.read().split()[-3:]
        CPU[0] = float(user) + float(system)
        o.seek(0)
        e.seek(0)
        out, err = o.read(), e.read()
    if p.returncode not in ok:
        sys.exit(f"{' '.join(argv[:3])}: exit {p.returncode}\n{out[-3000:]}\n{err[-3000:]}")
    return dt, int(rss_kib) / 1024, out, err


CPU = [0.0]


def config(path, state, store, public_key):
    with open(path, "w") as f:
        f.write(f'store = "{store}"\nstate-dir = "{state}"\nsocket = "{state}/sock"\npublic-keys = ["{public_key}"]\n')
    return path


def calls_of(report):
    c = report.get("calls")
    if c:
        return " ".join(f"{k} {v}" for k, v in c.items() if v)
    scan = report.get("scan") or {}
    fetched = report.get("fetched", scan.get("fetched"))
    return f"(reads {fetched})" if fetched is not None else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--narq", default=os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "release", "narq"))
    ap.add_argument("--label", default="")
    ap.add_argument("--cases", default="verify,gc,gc-real")
    ap.add_argument("--store", choices=["file", "garage"], default="file")
    ap.add_argument("--json")
    args = ap.parse_args()
    cache = os.path.join(args.out, "cache")
    public_key = open(os.path.join(args.out, "key.pub")).read().strip()
    meta = json.load(open(os.path.join(args.out, "meta.json")))
    cases = args.cases.split(",")
    work = tempfile.mkdtemp(prefix="narq-bench-scale-", dir=os.path.dirname(os.path.abspath(args.out)))
    env = dict(os.environ, RUST_LOG="warn")
    server = None
    results = []

    def line(case, secs, rss, report, **extra):
        load = os.getloadavg()[0]
        r = dict(label=args.label, store=args.store, paths=meta["paths"], case=case, seconds=round(secs, 2), cpu_seconds=round(CPU[0], 1), peak_rss_mib=round(rss, 1),
                 calls=report.get("calls"), load=extra.pop("load", load), **extra)
        results.append(r)
        print(f"{args.label:<8} {args.store:<6} {case:<12} {secs:8.1f} s  cpu {CPU[0]:7.1f} s  {rss:8.1f} MiB  {calls_of(report):<60} load {r['load']:.1f}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")

    try:
        if args.store == "garage":
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import local_s3
            from concurrent.futures import ThreadPoolExecutor
            server = local_s3.server("garage")
            server.create_bucket("bench")
            keys = []
            for d, _, files in os.walk(cache):
                keys.extend(os.path.relpath(os.path.join(d, f), cache) for f in files)
            t = time.perf_counter()

            def put(k):
                with open(os.path.join(cache, k), "rb") as f:
                    server.s3.put_object(Bucket="bench", Key=k, Body=f.read())
            with ThreadPoolExecutor(32) as ex:
                list(ex.map(put, keys))
            print(f"uploaded {len(keys)} objects to Garage in {time.perf_counter() - t:.0f} s", flush=True)
            store = server.store("bench")
            env.update(server.env())
            gc_extra = ["--grace", "0s"]
        else:
            store = f"file://{cache}"
            gc_extra = []
        state = os.path.join(work, "state")
        cfg = config(os.path.join(work, "narq.toml"), state, store, public_key)
        env["NARQ_CONFIG"] = cfg
        if "verify" in cases:
            load = os.getloadavg()[0]
            secs, rss, out, _ = run_rss([args.narq, "verify", "--json"], env)
            report = json.loads(out)
            assert report["checked"] == meta["paths"] and not report["problems"], out[-2000:]
            line("verify-cold", secs, rss, report, load=load)
            load = os.getloadavg()[0]
            secs, rss, out, _ = run_rss([args.narq, "verify", "--json"], env)
            line("verify-warm", secs, rss, json.loads(out), load=load)
        if "gc" in cases:
            load = os.getloadavg()[0]
            secs, rss, out, _ = run_rss([args.narq, "gc", "--dry-run", "--json", *gc_extra], env)
            report = json.loads(out)
            assert len(report["paths"]) == meta["garbage"], (len(report["paths"]), meta["garbage"])
            line("gc-dry", secs, rss, report, load=load, removed=len(report["paths"]))
        if "gc-real" in cases:
            if args.store == "file":
                copy = os.path.join(work, "copy")
                t = time.perf_counter()
                subprocess.run(["cp", "-al", cache, copy], check=True)
                print(f"(copied the cache as hard links in {time.perf_counter() - t:.0f} s)", flush=True)
                cfg = config(os.path.join(work, "copy.toml"), os.path.join(work, "state-copy"), f"file://{copy}", public_key)
                env["NARQ_CONFIG"] = cfg
                run_rss([args.narq, "gc", "--dry-run", "--json"], env)
            load = os.getloadavg()[0]
            secs, rss, out, _ = run_rss([args.narq, "gc", "--json", *gc_extra], env)
            report = json.loads(out)
            assert len(report["paths"]) == meta["garbage"], (len(report["paths"]), meta["garbage"])
            line("gc-real", secs, rss, report, load=load, removed=len(report["paths"]))
    finally:
        if server:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
