#!/usr/bin/env python3
"""`narq verify` against `nix store verify` on a synthetic cache (issue 11).

Generates a cache of N paths (default 20,000): narinfos with real ed25519 signatures and
small NARs (compression none), each path referencing up to two earlier ones, written
directly (not through narq) both to a bucket on a local S3 server (moto_server from .venv,
or with --garage a 3-node Garage cluster) and to a directory. Then, one line per case with both numbers and the ratio:
  - shallow, cold (empty index) and warm (second run): `narq verify` of the bucket and of the
    directory, against `nix store verify --store file://DIR --all --no-contents`;
  - the S3 server's own rate of narinfo GETs (boto3, 32 threads), which bounds a cold run;
  - deep: a ~1 GiB NAR (zstd, half random) in a directory cache: `narq verify --deep`
    against `nix store verify` of the same path (which downloads and hashes it).
Usage: bench/verify.py [--garage] [N]   (needs `cargo build --release`; the binary is taken from
$CARGO_TARGET_DIR, else target/). NARQ_BENCH_DEEP_MIB sets the deep NAR's size (1024).
"""
import base64, hashlib, json, os, random, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
NARQ = os.environ.get("NARQ_BENCH_NARQ") or os.path.join(TARGET, "release", "narq")
SERVER = "garage" if "--garage" in sys.argv[1:] else "moto"
ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
N = int(ARGS[0]) if ARGS else 20000
DEEP_MIB = int(os.environ.get("NARQ_BENCH_DEEP_MIB", "1024"))

sys.path.insert(0, next(p for p in __import__("glob").glob(os.path.join(ROOT, ".venv/lib/python3*/site-packages"))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_s3 import server  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

B32 = "0123456789abcdfghijklmnpqrsvwxyz"


def nixbase32(b):
    n = (len(b) * 8 - 1) // 5 + 1
    out = []
    for i in range(n - 1, -1, -1):
        bit = i * 5
        j, k = bit // 8, bit % 8
        c = b[j] >> k
        if j + 1 < len(b):
            c |= b[j + 1] << (8 - k)
        out.append(B32[c & 0x1f])
    return "".join(out)


def nar_str(s):
    return len(s).to_bytes(8, "little") + s + b"\0" * ((8 - len(s) % 8) % 8)


def nar_of(contents):
    return b"".join(nar_str(s) for s in [b"nix-archive-1", b"(", b"type", b"regular", b"contents", contents, b")"])


class Key:
    def __init__(self, name):
        self.name = name
        self.sk = Ed25519PrivateKey.generate()
        raw = lambda k, f: k.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()) if f else k.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.pub = raw(self.sk.public_key(), False)
        self.secret = f"{name}:" + base64.b64encode(raw(self.sk, True) + self.pub).decode()
        self.public = f"{name}:" + base64.b64encode(self.pub).decode()

    def sign(self, msg):
        return f"{self.name}:" + base64.b64encode(self.sk.sign(msg.encode())).decode()


def narinfo(path, refs, nar, file_bytes, url, compression, key):
    nar_hash = "sha256:" + nixbase32(hashlib.sha256(nar).digest()) if isinstance(nar, bytes) else nar[0]
    nar_size = len(nar) if isinstance(nar, bytes) else nar[1]
    file_hash = "sha256:" + nixbase32(hashlib.sha256(file_bytes).digest()) if isinstance(file_bytes, bytes) else file_bytes[0]
    file_size = len(file_bytes) if isinstance(file_bytes, bytes) else file_bytes[1]
    fp = f"1;{path};{nar_hash};{nar_size};{','.join(sorted(refs))}"
    refs_line = " ".join(sorted(r[len('/nix/store/'):] for r in refs))
    return (f"StorePath: {path}\nURL: {url}\nCompression: {compression}\nFileHash: {file_hash}\nFileSize: {file_size}\n"
            f"NarHash: {nar_hash}\nNarSize: {nar_size}\nReferences: {refs_line}\nSig: {key.sign(fp)}\n")


def timed(argv, env=None, ok=(0,)):
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode not in ok:
        sys.exit(f"{' '.join(argv[:4])}…: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return dt, r


def line(case, narq_s, nix_s):
    ratio = f"{nix_s / narq_s:.1f}x" if nix_s else "-"
    print(f"{case:<44} narq {narq_s:7.2f} s   nix {nix_s:7.2f} s   nix/narq {ratio}" if nix_s else f"{case:<44} narq {narq_s:7.2f} s", flush=True)


def main():
    assert os.path.exists(NARQ), f"{NARQ} missing: cargo build --release"
    tmp = tempfile.mkdtemp(prefix="narq-bench-verify-")
    key = Key("bench-1")
    rng = random.Random(1)
    moto = server(SERVER, os.path.join(tmp, "server.log"))
    port, s3 = moto.port, moto.s3
    try:
        moto.create_bucket("bench")
        cache = os.path.join(tmp, "cache")
        os.makedirs(os.path.join(cache, "nar"))
        objects = [("nix-cache-info", b"StoreDir: /nix/store\n")]
        paths = []
        t = time.perf_counter()
        for i in range(N):
            path = f"/nix/store/{nixbase32(rng.randbytes(20))}-bench-{i}"
            refs = {path} | ({paths[rng.randrange(i)] for _ in range(2)} if i else set())
            nar = nar_of(f"contents of {path}\n".encode() + rng.randbytes(rng.randrange(64, 512)))
            url = f"nar/{nixbase32(hashlib.sha256(nar).digest())}.nar"
            objects.append((url, nar))
            objects.append((f"{path[11:43]}.narinfo", narinfo(path, refs, nar, nar, url, "none", key).encode()))
            paths.append(path)
        for k, b in objects:
            with open(os.path.join(cache, k), "wb") as f:
                f.write(b)
        with ThreadPoolExecutor(32) as ex:
            list(ex.map(lambda kb: s3.put_object(Bucket="bench", Key=kb[0], Body=kb[1]), objects))
        print(f"generated {N} paths ({len(objects)} objects) in {time.perf_counter() - t:.0f} s; load {os.getloadavg()[0]:.1f}", flush=True)
        # What the S3 server itself serves: narinfo GETs from 32 threads (boto3), the bound on
        # any cold read of the bucket.
        sample = [k for k, _ in objects if k.endswith(".narinfo")][:2000]
        t = time.perf_counter()
        with ThreadPoolExecutor(32) as ex:
            list(ex.map(lambda k: s3.get_object(Bucket="bench", Key=k)["Body"].read(), sample))
        rate = len(sample) / (time.perf_counter() - t)
        print(f"the S3 server answers {rate:.0f} narinfo GETs/s (boto3, 32 threads): {N / rate:.1f} s for {N}", flush=True)

        nix_conf = os.path.join(tmp, "nix-conf")
        os.makedirs(nix_conf)
        with open(os.path.join(nix_conf, "nix.conf"), "w") as f:
            f.write("experimental-features = nix-command\nsubstituters =\n")
        def narq_env(state):
            cfg = os.path.join(tmp, f"{state}.toml")
            with open(cfg, "w") as f:
                f.write(f'state-dir = "{os.path.join(tmp, state)}"\nsocket = "{os.path.join(tmp, state, "sock")}"\n'
                        f'public-keys = ["{key.public}"]\n')
            return dict(os.environ, NARQ_CONFIG=cfg, **moto.env())
        nix_env = dict(os.environ, NIX_CONF_DIR=nix_conf, XDG_CACHE_HOME=os.path.join(tmp, "xdg"))
        nix_s, r = timed(["nix", "store", "verify", "--store", f"file://{cache}", "--all", "--no-contents",
                          "--sigs-needed", "1", "--option", "trusted-public-keys", key.public], nix_env)
        for what, store in [(f"S3 ({SERVER})", moto.store("bench")), ("directory", f"file://{cache}")]:
            env = narq_env("state-" + what[:2].lower().strip())
            cold, r = timed([NARQ, "verify", "--store", store, "--json"], env)
            report = json.loads(r.stdout)
            assert report["checked"] == N and not report["problems"], r.stdout[-2000:]
            warm, r2 = timed([NARQ, "verify", "--store", store, "--json"], env)
            assert json.loads(r2.stdout)["fetched"] == 0
            line(f"shallow {N} paths, {what}, cold", cold, nix_s)
            line(f"shallow {N} paths, {what}, warm", warm, nix_s)

        # Deep: one NAR of DEEP_MIB MiB, half random (compressible like real outputs).
        deep = os.path.join(tmp, "deep")
        os.makedirs(os.path.join(deep, "nar"))
        with open(os.path.join(deep, "nix-cache-info"), "w") as f:
            f.write("StoreDir: /nix/store\n")
        raw = os.path.join(tmp, "big.nar")
        size = DEEP_MIB << 20
        h = hashlib.sha256()
        with open(raw, "wb") as f:
            head = nar_str(b"nix-archive-1") + b"".join(nar_str(s) for s in [b"(", b"type", b"regular", b"contents"]) + size.to_bytes(8, "little")
            f.write(head)
            h.update(head)
            for _ in range(DEEP_MIB):
                chunk = rng.randbytes(512 << 10) + bytes(512 << 10)
                f.write(chunk)
                h.update(chunk)
            tail = nar_str(b")")
            f.write(tail)
            h.update(tail)
        nar_size = len(head) + size + len(tail)
        nar_hash = "sha256:" + nixbase32(h.digest())
        subprocess.run(["zstd", "-q", "-3", "-T0", "-f", raw, "-o", raw + ".zst"], check=True)
        os.remove(raw)
        fh = hashlib.sha256()
        with open(raw + ".zst", "rb") as f:
            while b := f.read(1 << 20):
                fh.update(b)
        file_size = os.path.getsize(raw + ".zst")
        url = f"nar/{nixbase32(fh.digest())}.nar.zst"
        os.rename(raw + ".zst", os.path.join(deep, url))
        big = f"/nix/store/{nixbase32(rng.randbytes(20))}-bench-big"
        text = narinfo(big, [], (nar_hash, nar_size), ("sha256:" + nixbase32(fh.digest()), file_size), url, "zstd", key)
        with open(os.path.join(deep, f"{big[11:43]}.narinfo"), "w") as f:
            f.write(text)
        env = narq_env("state-deep")
        narq_deep, r = timed([NARQ, "verify", "--deep", "--store", f"file://{deep}"], env)
        nix_deep, r = timed(["nix", "store", "verify", "--store", f"file://{deep}", "--sigs-needed", "1",
                             "--option", "trusted-public-keys", key.public, big], nix_env)
        line(f"deep, one {DEEP_MIB} MiB NAR (zstd)", narq_deep, nix_deep)
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        moto.stop()
        subprocess.run(["rm", "-rf", tmp])


if __name__ == "__main__":
    main()
