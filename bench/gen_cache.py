#!/usr/bin/env python3
"""A synthetic binary cache the size of a fleet's (issue 22), written fast.

    bench/gen_cache.py OUT [--paths 1000000] [--roots 4000] [--seed 1] [--jobs 2]
    bench/gen_cache.py OUT --upload garage|moto [--bucket NAME]   # OUT/cache into a local S3 server

Writes OUT/cache, a `file://` cache: `nix-cache-info`; per path a narinfo with a real ed25519
signature (narq's and Nix's key format, the key in OUT/key.sec and OUT/key.pub) and a tiny
NAR (`Compression: none`, ~200 bytes, so NarHash = FileHash); and `narq/roots/<hashpart>`
(protocol 2) for the roots. OUT/meta.json says what was made: counts, the key, the closure
sizes, and which paths a gc removes.

The reference graph (seeded, reproducible): a few dozen bootstrap paths shared by all, then
generations of 25,000 paths (a nixpkgs revision each): a core of 80 paths, libraries in six
levels (each referencing core paths and zero to five libraries of lower levels, popular ones
most), and the roots (applications) that reference whatever no library uses plus a few
popular libraries. Closures are 100-2,600 paths (median ~900) and share most of their
dependencies within a generation. The oldest tenth of the generations has no roots left
(they expired): `narq gc --grace 0s` removes them, ~10% of the paths, and nothing else.
Every object is dated 10 days ago but the roots (1 day ago).

`--upload` PUTs every object of OUT/cache into a bucket (created) of a local S3 server
(bench/local_s3.py), keeping it running until Enter or SIGTERM, and prints the store URL.
"""
import argparse, base64, hashlib, json, os, random, statistics, sys, time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pool

B32 = "0123456789abcdfghijklmnpqrsvwxyz"
GEN = 25000
WORDS = ("lib gtk python3 perl openssl zlib glib curl boost qt5 rust go node icu cairo pango harfbuzz "
         "freetype fontconfig sqlite xz bzip2 libxml2 expat dbus systemd gcc binutils ncurses readline "
         "util-linux coreutils bash gnugrep gnused gawk findutils diffutils patch tzdata cacert gettext").split()


PAIRS = [a + b for a in B32 for b in B32]


def nixbase32(b):
    """Nix's base32 (the last 5 bits first), two characters at a time."""
    n = (len(b) * 8 - 1) // 5 + 1
    x = int.from_bytes(b, "little")
    head = [B32[(x >> ((n - 1) * 5)) & 31]] if n % 2 else []
    return "".join(head + [PAIRS[(x >> ((i - 1) * 5)) & 1023] for i in range(n - 1 - n % 2, 0, -2)])


def nar_str(s):
    return len(s).to_bytes(8, "little") + s + b"\0" * ((8 - len(s) % 8) % 8)


def nar_of(contents):
    return b"".join(nar_str(s) for s in [b"nix-archive-1", b"(", b"type", b"regular", b"contents", contents, b")"])


def graph(n, roots, seed):
    """References (indices of earlier paths) of n paths, the roots, and each path's generation."""
    rng = random.Random(seed)
    gens = max(1, n // GEN)
    boot = min(40, n)
    refs = [sorted({rng.randrange(i) for _ in range(min(i, rng.randint(1, 3)))}) if i else [] for i in range(boot)]
    gen_of = [-1] * boot
    root_ids = []
    start = boot
    for g in range(gens):
        m = (n - boot) // gens if g < gens - 1 else n - start
        r = max(1, roots // gens if g < gens - 1 else roots - len(root_ids))
        core = min(80, m // 4)
        nlib = max(0, m - core - r)
        ids = range(start, start + m)
        levels = [[] for _ in range(6)]
        unref = []
        shares = None
        for j, i in enumerate(ids):
            if j < core:
                rs = {rng.randrange(boot)} | ({ids[rng.randrange(j)] for _ in range(rng.randint(1, 4))} if j else set())
            elif j < core + nlib:
                lv = min(5, (j - core) * 6 // nlib)
                rs = {ids[rng.randrange(core)] for _ in range(rng.randint(1, 2))}
                for _ in range(rng.randint(0, 5) if lv else 0):
                    lower = levels[rng.randrange(lv)]
                    if lower:
                        rs.add(lower[int((rng.random() ** 2) * len(lower))])
                levels[lv].append(i)
            else:
                if shares is None:
                    used = {x for k in range(start + core, i) for x in refs[k]}
                    unref = [x for lv in levels for x in lv if x not in used]
                    rng.shuffle(unref)
                    weights = [10 ** rng.uniform(0, 1.3) for _ in range(m - j)]
                    total, at, shares = sum(weights), 0, []
                    for w in weights:
                        k = int(round(w / total * len(unref)))
                        shares.append(unref[at:at + k])
                        at += k
                    shares[-1] = shares[-1] + unref[at:]
                rs = {ids[rng.randrange(core)]} | set(shares[j - core - nlib])
                for _ in range(rng.randint(2, 12)):
                    lower = levels[rng.randrange(6)]
                    if lower:
                        rs.add(lower[int((rng.random() ** 2) * len(lower))])
                root_ids.append(i)
            refs.append(sorted(rs))
        gen_of.extend([g] * m)
        start += m
    return refs, root_ids, gen_of, gens


def closure(refs, r):
    seen, stack = {r}, [r]
    while stack:
        for y in refs[stack.pop()]:
            if y not in seen:
                seen.add(y)
                stack.append(y)
    return seen


class Key:
    def __init__(self, name, seed):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives import serialization as s
        self.name = name
        self.sk = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"narq-bench-key-%d" % seed).digest())
        raw_sk = self.sk.private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption())
        pub = self.sk.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
        self.secret = f"{name}:" + base64.b64encode(raw_sk + pub).decode()
        self.public = f"{name}:" + base64.b64encode(pub).decode()

    def sign(self, msg):
        return f"{self.name}:" + base64.b64encode(self.sk.sign(msg)).decode()


def path_of(seed, i):
    h = hashlib.sha256(b"narq-bench-path-%d-%d" % (seed, i)).digest()[:20]
    rng = random.Random(i)
    name = f"{rng.choice(WORDS)}-{rng.randint(0, 9)}.{rng.randint(0, 40)}.{rng.randint(0, 9)}"
    return nixbase32(h), name


# Worker state, set by init (fork: the graph is shared copy-on-write).
W = {}


def init(state):
    W.update(state)
    W["key"] = Key(state["key_name"], state["seed"])


def write(path, data, mtime):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.utime(path, (mtime, mtime))


def work(chunk):
    """Writes the narinfos and NARs of paths chunk[0]..chunk[1]."""
    seed, refs, names, out, key, mtime = W["seed"], W["refs"], W["names"], W["out"], W["key"], W["mtime"]
    for i in range(*chunk):
        hp, name = names[i]
        path = f"/nix/store/{hp}-{name}"
        nar = nar_of(f"contents of {path}\n".encode() + hashlib.sha256(b"%d" % i).digest())
        digest = hashlib.sha256(nar).digest()
        nar_hash = "sha256:" + nixbase32(digest)
        url = f"nar/{nixbase32(digest)}.nar"
        rs = sorted(f"/nix/store/{names[r][0]}-{names[r][1]}" for r in refs[i])
        fp = f"1;{path};{nar_hash};{len(nar)};{','.join(rs)}".encode()
        body = (f"StorePath: {path}\nURL: {url}\nCompression: none\nFileHash: {nar_hash}\nFileSize: {len(nar)}\n"
                f"NarHash: {nar_hash}\nNarSize: {len(nar)}\nReferences: {' '.join(r[11:] for r in rs)}\n"
                f"Deriver: {hp[::-1]}-{name}.drv\nSig: {key.sign(fp)}\n")
        write(os.path.join(out, url), nar, mtime)
        write(os.path.join(out, f"{hp}.narinfo"), body.encode(), mtime)
    return chunk[1] - chunk[0]


def generate(args):
    t0 = time.perf_counter()
    refs, roots, gen_of, gens = graph(args.paths, args.roots, args.seed)
    names = [path_of(args.seed, i) for i in range(args.paths)]
    expired = max(1, gens // 10) if gens >= 2 else 0
    live_roots = [r for r in roots if gen_of[r] >= expired]
    sample = random.Random(args.seed).sample(live_roots, min(200, len(live_roots)))
    sizes = sorted(len(closure(refs, r)) for r in sample)
    kept = set()
    for r in live_roots:
        kept |= closure(refs, r)
    t_graph = time.perf_counter() - t0
    print(f"graph: {args.paths} paths, {len(roots)} roots in {gens} generations ({expired} without roots), "
          f"{sum(map(len, refs)) / args.paths:.2f} references a path, closures {sizes[0]}-{sizes[-1]} (median "
          f"{statistics.median(sizes):.0f}), {args.paths - len(kept)} garbage; {t_graph:.0f} s", flush=True)

    cache = os.path.join(args.out, "cache")
    os.makedirs(os.path.join(cache, "nar"), exist_ok=True)
    os.makedirs(os.path.join(cache, "narq", "roots"), exist_ok=True)
    key = Key("bench-1", args.seed)
    with open(os.path.join(args.out, "key.sec"), "w") as f:
        f.write(key.secret)
    with open(os.path.join(args.out, "key.pub"), "w") as f:
        f.write(key.public)
    now = time.time()
    old = now - 10 * 86400
    write(os.path.join(cache, "nix-cache-info"), b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n", old)
    state = dict(seed=args.seed, refs=refs, names=names, out=cache, key_name=key.name, mtime=old)
    step = 5000
    chunks = [(a, min(a + step, args.paths)) for a in range(0, args.paths, step)]
    done = 0
    with Pool(args.jobs, initializer=init, initargs=(state,)) as pool:
        for k in pool.imap_unordered(work, chunks):
            done += k
            if done % 100000 < step:
                print(f"  {done} paths, {time.perf_counter() - t0:.0f} s", flush=True)
    for r in live_roots:
        hp, name = names[r]
        write(os.path.join(cache, "narq", "roots", hp), f"/nix/store/{hp}-{name}\nnarq-protocol 2\n".encode(), now - 86400)
    meta = dict(paths=args.paths, roots=len(live_roots), generations=gens, expired_generations=expired,
                garbage=args.paths - len(kept), references=sum(map(len, refs)), closure_min=sizes[0],
                closure_median=statistics.median(sizes), closure_max=sizes[-1], public_key=key.public,
                objects=2 * args.paths + len(live_roots) + 1, seconds=round(time.perf_counter() - t0, 1))
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {meta['objects']} objects to {cache} in {meta['seconds']} s", flush=True)


def upload(args):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import local_s3
    cache = os.path.join(args.out, "cache")
    server = local_s3.server(args.upload)
    try:
        server.create_bucket(args.bucket)
        keys = []
        for d, _, files in os.walk(cache):
            keys.extend(os.path.relpath(os.path.join(d, f), cache) for f in files)
        t = time.perf_counter()
        s3 = server.s3

        def put(k):
            with open(os.path.join(cache, k), "rb") as f:
                s3.put_object(Bucket=args.bucket, Key=k, Body=f.read())
        with ThreadPoolExecutor(args.threads) as ex:
            for n, _ in enumerate(ex.map(put, keys), 1):
                if n % 20000 == 0:
                    print(f"  {n}/{len(keys)} objects, {n / (time.perf_counter() - t):.0f}/s", flush=True)
        print(f"uploaded {len(keys)} objects in {time.perf_counter() - t:.0f} s", flush=True)
        print(json.dumps(dict(store=server.store(args.bucket), env=server.env(), pid=os.getpid())), flush=True)
        try:
            sys.stdin.readline()
        except KeyboardInterrupt:
            pass
    finally:
        server.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--paths", type=int, default=1_000_000)
    ap.add_argument("--roots", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--upload", choices=["garage", "moto"])
    ap.add_argument("--bucket", default="bench")
    ap.add_argument("--threads", type=int, default=32)
    args = ap.parse_args()
    upload(args) if args.upload else generate(args)


if __name__ == "__main__":
    main()
