#!/usr/bin/env python3
"""`narq gc --dry-run` on a synthetic cache: cold (no index) and warm (index in the state dir).

    python3 bench/gc.py [--paths 20000] [--s3 | --garage]   # narq from target/release or target/debug

Writes a cache of N narinfos (each referencing up to 3 earlier paths, so closures overlap),
one small NAR each, and a root object for every 10th path, then times `narq gc --dry-run
--json` twice and prints what it reports of its requests. With --s3 the cache goes into a
moto bucket (.venv/bin/moto_server) instead of a directory, with --garage into a bucket of a
3-node Garage cluster (scripts/setup-garage.sh builds Garage).
"""
import argparse, hashlib, json, os, random, shutil, subprocess, sys, tempfile, time

ALPHA = "0123456789abcdfghijklmnpqrsvwxyz"  # nixbase32


def b32(data: bytes, n: int) -> str:
    """Nix's base32 of the first n*5/8 bytes of sha256(data) (n = 32: a store path hash, 52: a sha256)."""
    d = hashlib.sha256(data).digest()[: n * 5 // 8]
    out = []
    for k in range(n - 1, -1, -1):
        b = k * 5
        i, j = b // 8, b % 8
        c = (d[i] >> j) | ((d[i + 1] << (8 - j)) if i + 1 < len(d) else 0)
        out.append(ALPHA[c & 0x1F])
    return "".join(out)


def objects(n: int):
    rnd = random.Random(42)
    paths = []
    for i in range(n):
        hp = b32(b"path%d" % i, 32)
        name = f"{hp}-synthetic-{i}"
        refs = sorted({paths[rnd.randrange(len(paths))] for _ in range(rnd.randrange(4))}) if paths else []
        nar = f"nar/{b32(b'nar%d' % i, 52)}.nar.zst"
        body = (
            f"StorePath: /nix/store/{name}\nURL: {nar}\nCompression: zstd\n"
            f"FileHash: sha256:{b32(b'fh%d' % i, 52)}\nFileSize: 1000\n"
            f"NarHash: sha256:{b32(b'nh%d' % i, 52)}\nNarSize: 2000\n"
            f"References: {' '.join(refs)}\n"
        )
        yield f"{hp}.narinfo", body.encode()
        yield nar, b"x" * 1000
        if i % 10 == 0:
            yield f"narq/roots/{hp}", f"/nix/store/{name}\n".encode()
        paths.append(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", type=int, default=20000)
    ap.add_argument("--s3", action="store_true")
    ap.add_argument("--garage", action="store_true")
    args = ap.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    narq = next(p for p in (f"{repo}/target/release/narq", f"{repo}/target/debug/narq") if os.path.exists(p))
    tmp = tempfile.mkdtemp(prefix="narq-bench-gc-")
    moto = None
    try:
        t0 = time.time()
        env = dict(os.environ)
        if args.s3 or args.garage:
            from concurrent.futures import ThreadPoolExecutor
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from local_s3 import server
            moto = server("garage" if args.garage else "moto")
            c = moto.s3
            moto.create_bucket("bench")
            with ThreadPoolExecutor(16) as ex:
                list(ex.map(lambda kv: c.put_object(Bucket="bench", Key=kv[0], Body=kv[1]), objects(args.paths)))
            store = moto.store("bench")
            env.update(moto.env())
        else:
            for key, body in objects(args.paths):
                p = os.path.join(tmp, "cache", key)
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, "wb") as f:
                    f.write(body)
            store = f"file://{tmp}/cache"
        print(f"wrote {args.paths} paths in {time.time() - t0:.1f} s ({moto.name + ' S3' if moto else 'file://'})")
        cfg = f"{tmp}/config.toml"
        with open(cfg, "w") as f:
            f.write(f'store = "{store}"\nstate-dir = "{tmp}/state"\nsocket = "{tmp}/narq.sock"\n')
        for run in ("cold", "warm"):
            t = time.time()
            out = subprocess.run([narq, "--config", cfg, "gc", "--dry-run", "--json", "--keep-days", "30", "--grace", "0s"], env=env, capture_output=True, text=True)
            dt = time.time() - t
            if out.returncode != 0:
                sys.exit(out.stderr)
            j = json.loads(out.stdout)
            lists = -(-j["scan"]["objects"] // 1000)
            print(f"{run}: {dt:.2f} s; {j['scan']['objects']} objects listed (~{lists} LIST pages on S3), "
                  f"{j['scan']['fetched']} narinfos fetched, scan {j['scan']['scan_ms']} ms; would remove {len(j['paths'])} paths, keep {j['kept_paths']}")
    finally:
        if moto:
            moto.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
