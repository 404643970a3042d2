#!/usr/bin/env python3
"""narq vs `nix copy` and vs the machine's limits, uploading to one S3 server (moto on
127.0.0.1, or with --garage a 3-node Garage cluster), every comparison in one run; one line
per case with both numbers and the ratio.

Fairness: Nix 2.8 from Debian has no s3:// support, so Nix uploads with HTTP PUTs to
http://127.0.0.1:PORT/BUCKET on the same moto server (moto accepts them) and narq uses the
S3 API; both compress with zstd at level 3 (narq's default; Nix's `compression=zstd`
default level is 3 too), both start with the store path in the page cache, both go through
the same proxy in the slow-link cases. Each tool gets a fresh, empty bucket.
Cases (pick some with arguments; default all):
  big      one ~1 GB store path (/usr/lib/x86_64-linux-gnu, added with --add-fixed
           --recursive; removed again at the end): narq vs the compression limit
           (`nix-store --dump P | zstd -T0 -3 | sha256sum` from the page cache) and vs
           `nix copy`; the narq daemon's peak RSS vs nix copy's;
  small    a closure of 500 small paths, then the same closure again (the S3 server's log
           counts the requests that upload: PUT and POST);
  slow     through a delaying proxy written here (127.0.0.1 only; 50 ms per round trip,
           i.e. 25 ms each way, and 50 MiB/s each way shared by all connections; bounded
           queues): 300 small paths vs nix copy, and the 1 GB path vs the link's limit
           (its compressed size / 50 MiB/s) and vs nix copy;
  huge     a closure of 10,000 generated paths (builtins.toFile, one build): the daemon's
           peak RSS, and the hook's median time once the closure is queued (20 runs);
  compress zstd levels 1, 3 and 9 and xz (level 6, Nix's default) on the 1 GB path, each
           through narq to a file:// cache: time and ratio;
  n234     today's Nix: Nix 2.34 (Debian sid, in the chroot scripts/setup-sid.sh makes) with
           its own `nix copy --to s3://` (multipart, parallel zstd), beside 2.8's (HTTP PUTs)
           and narq (its daemon in the chroot too, where the store is), on the same moto: 300
           small paths and a ~290 MiB path (the first files of /usr/lib/x86_64-linux-gnu,
           added to both stores: the same store path), on loopback and through the slow link;
           and the local limit for the big path.
On Garage, `nix copy` cannot take part: Nix 2.8 writes with unsigned HTTP PUTs, which
Garage refuses; its rows show narq alone, beside the limits.
With --s3s the server is s3s-fs (Rust; bench/local_s3.py says how to install it), fast
enough that the uploaders set the pace: Nix writes to an unsigned port of it, narq to a
signed one, over one directory.
Usage: bench/s3_vs_nix_copy.py [--garage | --s3s] [big small slow huge compress n234]
       (run scripts/setup.sh and cargo build --release first; binaries from
       $CARGO_TARGET_DIR/release, else target/release)
moto and boto3 come from the repo's .venv/ (scripts/setup.sh), which runs this script; Nix's
settings from a private NIX_CONF_DIR.
"""
import asyncio, os, re, shutil, statistics, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "release")
NARQ = os.path.join(BIN, "narq")
HOOK = os.environ.get("NARQ_BENCH_HOOK") or os.path.join(BIN, "narq-hook")
VENV = os.path.join(ROOT, ".venv")
if not os.path.exists(os.path.join(VENV, "bin", "moto_server")):
    sys.exit(f"{VENV}/bin/moto_server not found: run scripts/setup.sh")
if os.path.realpath(sys.prefix) != os.path.realpath(VENV):
    os.execv(os.path.join(VENV, "bin", "python"), [os.path.join(VENV, "bin", "python")] + sys.argv)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_s3 import free_port, server  # noqa: E402

SERVER = "garage" if "--garage" in sys.argv[1:] else "s3s" if "--s3s" in sys.argv[1:] else "moto"
CASES = [a for a in sys.argv[1:] if not a.startswith("--")] or ["big", "small", "slow", "huge", "compress", "n234"]
if SERVER == "garage" and "n234" in CASES:
    # Nix 2.34 in the chroot writes s3:// anonymously (Debian builds it without credentials).
    CASES.remove("n234")
SID = os.environ.get("NARQ_SID_DIR", "/var/cache/narq-test/sid")
# Enters the sid chroot in a private mount namespace: ROOT BIN_DIR TMP_DIR PROGRAM ARGS...
# (as tests/it/util.rs's Sid does).
SID_ENTER = "\n".join([
    "set -e",
    "r=$1 b=$2 t=$3; shift 3",
    'mount -t proc proc "$r/proc"',
    'mount --rbind /dev "$r/dev"',
    'mkdir -p "$r$t" "$r$b"',
    'mount --bind "$t" "$r$t"',
    'mount --bind "$b" "$r$b"',
    'exec chroot "$r" "$@"',
])


def in_sid(*args):
    """A command line that runs ARGS inside the sid chroot."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", SID_ENTER, "sh", SID, BIN, tempfile.gettempdir()] + list(args)
ZSTD_LEVEL = 3


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


# The CPU seconds (user + system) of the last command `timed` ran.
LAST = {"cpu": 0.0}


def timed(args, env=None):
    """Wall seconds and peak RSS (KiB) of a command, via GNU time (its CPU time in LAST)."""
    t = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%M %U %S"] + args, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"{args} failed: {out.stderr}")
    rss, user, system = out.stderr.strip().splitlines()[-1].split()
    LAST["cpu"] = float(user) + float(system)
    return dt, int(rss)


class SlowLink:
    """A TCP proxy on 127.0.0.1 to 127.0.0.1:upstream that delays every byte by ONE_WAY in
    each direction (a round trip costs 2 × ONE_WAY) and passes at most RATE bytes/s each
    way, all connections sharing the link. Per connection and direction at most QUEUE
    chunks wait, so memory is bounded; it stops with the bench."""
    ONE_WAY = 0.025
    RATE = 50 << 20
    QUEUE = 64
    CHUNK = 64 << 10

    def __init__(self, upstream):
        self.upstream = upstream
        self.port = free_port()
        self.free_at = {"up": 0.0, "down": 0.0}
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._conn, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_forever()

    async def _pump(self, reader, writer, way):
        q = asyncio.Queue(self.QUEUE)
        loop = asyncio.get_running_loop()

        async def send():
            while (item := await q.get()) is not None:
                due, data = item
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(send())
        try:
            while data := await reader.read(self.CHUNK):
                # The link is busy until free_at: this chunk leaves after the ones before it.
                start = max(loop.time(), self.free_at[way])
                self.free_at[way] = start + len(data) / self.RATE
                await q.put((self.free_at[way] + self.ONE_WAY, data))
        except (ConnectionError, OSError):
            pass
        await q.put(None)
        try:
            await sender
        except (ConnectionError, OSError):
            pass

    async def _conn(self, cr, cw):
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            cw.close()
            return
        await asyncio.gather(self._pump(cr, sw, "up"), self._pump(sr, cw, "down"), return_exceptions=True)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)


def main():
    tmp = tempfile.mkdtemp(prefix="narq-s3bench-")
    moto_log = os.path.join(tmp, "moto.log")
    moto = server(SERVER, moto_log)
    port, s3 = moto.port, moto.s3
    # Where Nix writes: the same server; s3s-fs takes Nix's unsigned requests on a port of its own.
    nix_port = getattr(moto, "anon_port", port)
    if SERVER == "garage":
        print(f"garage: a 3-node cluster up in {moto.setup_seconds:.1f} s", flush=True)
    state = {"daemon": None}
    big = None
    conf = os.path.join(tmp, "nix")
    # A cache directory of this run's own: Nix keeps what it learnt of a binary cache (which
    # paths it has, for 30 days) keyed by the store's URL, and Nix 2.34's s3:// URL there is
    # the bucket's name alone, so a bucket name of an earlier run made it skip the upload.
    nixenv = dict(os.environ, NIX_CONF_DIR=conf, XDG_CACHE_HOME=os.path.join(tmp, "xdg-cache"))
    rows = []

    def row(name, a_name, a, b_name, b, note=""):
        """One line: both numbers and how many times faster the second is (a / b); the
        second alone where there is no first (`nix copy` on Garage)."""
        name = f"[{SERVER}] {name}"
        if a is None:
            line = f"{name:<43} {b_name} {b:>7.2f} s   {note}"
        else:
            line = f"{name:<43} {a_name} {a:>7.2f} s   {b_name} {b:>7.2f} s   ratio {a / b:>5.2f}x  {note}"
        rows.append(line)
        print(line, flush=True)

    try:
        os.makedirs(conf)
        with open(os.path.join(conf, "nix.conf"), "w") as f:
            f.write("sandbox = false\nbuild-users-group =\nsubstituters =\nmax-jobs = 8\n")
        key = os.path.join(tmp, "key.sec")
        sh(NARQ, "keygen", "bench-1", "--secret-key-file", key, "--public-key-file", key + ".pub")
        stamp = str(time.time_ns())

        def closure_of(n, tag, sid=False):
            """A top path referring to n - 1 leaves, each built by its own derivation (by Nix
            2.34 in the chroot's store if `sid`)."""
            leaf = ('derivation { name = "s3bench-%s-${toString i}-%s"; system = builtins.currentSystem; '
                    'builder = "/bin/sh"; args = ["-c" "echo ${toString i} > $out"]; }' % (tag, stamp))
            return sh(*(in_sid if sid else lambda *a: list(a))("nix-build", "--no-out-link", "-E",
                      'let leaf = i: %s; in derivation { name = "s3bench-%s-top-%s"; system = builtins.currentSystem; '
                      'builder = "/bin/sh"; args = ["-c" "echo ${toString (builtins.genList leaf %d)} > $out"]; }'
                      % (leaf, tag, stamp, n - 1)), env=nixenv).strip()

        def stop_daemon():
            d = state["daemon"]
            if d:
                d.terminate()
                d.wait()
                state["daemon"] = None

        def fresh_narq(bucket, store=None, sid=False):
            stop_daemon()
            if store is None:
                moto.create_bucket(bucket)
                store = moto.store(bucket) + "&compression=zstd"
            st = os.path.join(tmp, bucket)
            cfg = os.path.join(tmp, bucket + ".toml")
            with open(cfg, "w") as f:
                f.write(f'state-dir = "{st}"\nsocket = "{st}.sock"\nsecret-key-files = ["{key}"]\n'
                        + os.environ.get('NARQ_BENCH_EXTRA', '') + f'\nstore = "{store}"\n')
            env = dict(os.environ, NARQ_CONFIG=cfg, NIX_CONF_DIR=conf, **moto.env())
            cmd = in_sid(NARQ, "daemon") if sid else [NARQ, "daemon"]
            state["daemon"] = subprocess.Popen(cmd, env=env, stderr=open(st + ".log", "w"))
            for _ in range(200):
                if subprocess.run([NARQ, "status"], env=env, capture_output=True).returncode == 0:
                    break
                time.sleep(0.05)
            return env

        def narq_push(env, path, sid=False):
            t = time.perf_counter()
            sh(*(in_sid(NARQ, "push", "--wait", path) if sid else [NARQ, "push", "--wait", path]), env=env)
            return time.perf_counter() - t

        def daemon_cpu():
            """CPU seconds the running daemon has used."""
            with open(f"/proc/{state['daemon'].pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        def daemon_peak():
            with open(f"/proc/{state['daemon'].pid}/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024

        def nix_copy(bucket, path, via=None):
            """`nix copy` over HTTP: seconds and peak RSS; (None, None) on Garage."""
            if SERVER == "garage":
                return None, None
            s3.create_bucket(Bucket=bucket)
            return timed(["nix", "--extra-experimental-features", "nix-command", "copy", "--to",
                          f"http://127.0.0.1:{via or nix_port}/{bucket}?compression=zstd&compression-level={ZSTD_LEVEL}", path],
                         env=nixenv)

        def requests_and_cpu():
            """Requests the server served, and CPU seconds it has used: where the time goes
            when the server is the bottleneck."""
            return moto.requests_and_cpu()

        def server_note(before, after):
            requests = f"{after[0] - before[0]} requests, " if after[0] is not None else ""
            return f"server: {requests}{after[1] - before[1]:.1f} CPU s"

        def uploads():
            """Requests in moto's log that upload (PUT, POST); None on Garage."""
            if SERVER == "garage":
                return None
            with open(moto_log) as f:
                return sum(1 for l in f if re.search(r'"(\x1b\[[0-9;]*m)*(PUT|POST) ', l))

        def big_path():
            nonlocal big
            if big is None:
                big = sh("nix-store", "--add-fixed", "--recursive", "sha256", "/usr/lib/x86_64-linux-gnu", env=nixenv).strip()
                size = int(sh("du", "-sb", big).split()[0])
                print(f"1 GB path: {big} ({size / 2**20:.0f} MiB)", flush=True)
            # Into the page cache, for every contender alike.
            subprocess.run(f"nix-store --dump {big} > /dev/null", shell=True, check=True, env=nixenv)
            return big

        if "big" in CASES:
            p = big_path()
            t = time.perf_counter()
            limit_hash = subprocess.run(f"nix-store --dump {p} | zstd -T0 -{ZSTD_LEVEL} | sha256sum", shell=True,
                                        check=True, capture_output=True, env=nixenv)
            limit = time.perf_counter() - t
            env = fresh_narq("narq-big")
            s0 = requests_and_cpu()
            narq_t = narq_push(env, p)
            s1 = requests_and_cpu()
            peak = daemon_peak()
            stop_daemon()
            nix_t, nix_rss = nix_copy("nix-big", p)
            row("1 GB path: the compression limit", "zstd -T0 -3 | sha256sum", limit, "narq", narq_t,
                f"(narq / limit: {narq_t / limit:.2f}x; narq's {server_note(s0, s1)})")
            row("1 GB path: nix copy", "nix copy", nix_t, "narq", narq_t,
                f"peak RSS: nix copy {nix_rss / 1024:.0f} MiB, narq daemon {peak:.0f} MiB" if nix_rss else f"narq daemon peak RSS {peak:.0f} MiB")

        if "small" in CASES:
            top = closure_of(500, "small")
            s0 = requests_and_cpu()
            nix_t, _ = nix_copy("nix-small", top)
            s1 = requests_and_cpu()
            env = fresh_narq("narq-small")
            s2 = requests_and_cpu()
            narq_t = narq_push(env, top)
            s3_ = requests_and_cpu()
            row("500 small paths", "nix copy", nix_t, "narq", narq_t,
                (f"nix copy's {server_note(s0, s1)}; " if nix_t else "") + f"narq's {server_note(s2, s3_)}")
            if SERVER == "garage":
                s0 = requests_and_cpu()
                narq_t2 = narq_push(env, top)
                row("500 paths again", None, None, "narq", narq_t2, f"narq's {server_note(s0, requests_and_cpu())}")
            else:
                before = uploads()
                nix_t2, _ = timed(["nix", "--extra-experimental-features", "nix-command", "copy", "--to",
                                   f"http://127.0.0.1:{port}/nix-small?compression=zstd", top], env=nixenv)
                nix_uploads = uploads() - before
                before = uploads()
                narq_t2 = narq_push(env, top)
                row("500 paths again", "nix copy", nix_t2, "narq", narq_t2,
                    f"uploading requests: nix copy {nix_uploads}, narq {uploads() - before}")
            stop_daemon()

        if "slow" in CASES:
            link = SlowLink(port)
            nix_link = SlowLink(nix_port) if nix_port != port else link
            top = closure_of(300, "slow")
            nix_t, _ = nix_copy("nix-slow", top, via=nix_link.port)
            moto.create_bucket("narq-slow")
            env = fresh_narq("narq-slow", moto.store("narq-slow", link.port) + "&compression=zstd")
            narq_t = narq_push(env, top)
            row("300 small paths, slow link", "nix copy", nix_t, "narq", narq_t)
            p = big_path()
            moto.create_bucket("narq-slowbig")
            env = fresh_narq("narq-slowbig", moto.store("narq-slowbig", link.port) + "&compression=zstd")
            # Where the CPU goes: the link (this process's proxy thread), the server, narq.
            s0, proxy0 = requests_and_cpu(), time.process_time()
            narq_t = narq_push(env, p)
            s1, proxy1 = requests_and_cpu(), time.process_time()
            narq_cpu = daemon_cpu()
            stop_daemon()
            info = next(o for o in s3.list_objects_v2(Bucket="narq-slowbig")["Contents"] if o["Key"].startswith("nar/"))
            link_limit = info["Size"] / SlowLink.RATE
            row("1 GB path, slow link: link limit", "size / 50 MiB/s", link_limit, "narq", narq_t,
                f"(narq / limit: {narq_t / link_limit:.2f}x; {info['Size'] / 2**20:.0f} MiB compressed; CPU s: "
                f"narq {narq_cpu:.1f}, the link's proxy {proxy1 - proxy0:.1f}, {server_note(s0, s1)})")
            if os.environ.get("NARQ_BENCH_SLOW_NIX_BIG", "1") == "1" and SERVER != "garage":
                nix_t, _ = nix_copy("nix-slowbig", p, via=nix_link.port)
                row("1 GB path, slow link: nix copy", "nix copy", nix_t, "narq", narq_t)
            link.stop()
            nix_link.stop()

        if "huge" in CASES:
            n = 10_000
            leaves = " ".join(f'(builtins.toFile "s3bench-huge-{i}-{stamp}" "{i}")' for i in range(n - 1))
            expr_file = os.path.join(tmp, "huge.nix")
            with open(expr_file, "w") as f:
                # The list goes in a file (passAsFile): as one argument it would pass exec's
                # 128 KiB limit.
                f.write('derivation { name = "s3bench-huge-top-%s"; system = builtins.currentSystem; builder = "/bin/sh"; '
                        'refs = toString [ %s ]; passAsFile = [ "refs" ]; args = ["-c" "/bin/cat $refsPath > $out"]; }'
                        % (stamp, leaves))
            top = sh("nix-build", "--no-out-link", expr_file, env=nixenv).strip()
            drv = sh("nix-store", "-q", "--deriver", top, env=nixenv).strip()
            env = fresh_narq("narq-huge")
            narq_t = narq_push(env, top)
            peak = daemon_peak()
            # The hook as Nix runs it once the closure is queued (and uploaded).
            hook_env = dict(env, OUT_PATHS="", DRV_PATH=drv)
            times = []
            for _ in range(20):
                t = time.perf_counter()
                subprocess.run([HOOK], env=hook_env, check=True, capture_output=True)
                times.append(time.perf_counter() - t)
            stop_daemon()
            line = (f"{n:,} paths: narq push {narq_t:.2f} s, daemon peak RSS {peak:.0f} MiB (goal < 64); "
                    f"hook once queued: median {statistics.median(times) * 1000:.1f} ms (goal < 30)")
            rows.append(line)
            print(line, flush=True)

        if "compress" in CASES:
            p = big_path()
            nar_size = int(sh("nix-store", "-q", "--size", p, env=nixenv))
            # NARQ_BENCH_XZ_LEVEL=none leaves xz out (level 6 takes minutes on this VM).
            xz = os.environ.get("NARQ_BENCH_XZ_LEVEL", "6")
            for comp, level in [("zstd", 1), ("zstd", 3), ("zstd", 9)] + ([("xz", int(xz))] if xz != "none" else []):
                cache = os.path.join(tmp, f"cache-{comp}{level}")
                env = fresh_narq(f"file-{comp}{level}", f"file://{cache}?compression={comp}&compression-level={level}")
                t = narq_push(env, p)
                stop_daemon()
                size = sum(os.path.getsize(os.path.join(cache, "nar", f)) for f in os.listdir(os.path.join(cache, "nar")))
                line = f"compression {comp} {level:<2} on the 1 GB path: {t:>7.2f} s, ratio {nar_size / size:.2f} ({size / 2**20:.0f} MiB)"
                rows.append(line)
                print(line, flush=True)
                shutil.rmtree(cache, ignore_errors=True)

        if "n234" in CASES:
            if not os.path.exists(os.path.join(SID, ".narq-ready")):
                sys.exit(f"no Nix 2.34 chroot at {SID}: run scripts/setup.sh")
            version = open(os.path.join(SID, ".narq-ready")).read().strip()
            print(f"Nix in the chroot: {version}", flush=True)

            def nix234_copy(bucket, path, via=None):
                s3.create_bucket(Bucket=bucket)
                url = (f"s3://{bucket}?endpoint=http://127.0.0.1:{via or nix_port}&region=us-east-1&compression=zstd"
                       f"&compression-level={ZSTD_LEVEL}&parallel-compression=true&multipart-upload=true")
                result = timed(in_sid("nix", "--extra-experimental-features", "nix-command", "copy", "--to", url, path), env=nixenv)
                # A time only counts if Nix uploaded: the top path's narinfo is there.
                key = os.path.basename(path)[:32] + ".narinfo"
                if not any(o["Key"] == key for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])):
                    sys.exit(f"nix copy --to {url} {path} uploaded no {key}")
                return result

            # The same closure in both stores (same derivations, same paths).
            top = closure_of(300, "n234", sid=True)
            assert closure_of(300, "n234") == top
            # ~290 MiB of real files, added to both stores.
            src = os.path.join(tmp, "lib290")
            os.makedirs(src)
            total, libdir = 0, "/usr/lib/x86_64-linux-gnu"
            for name in sorted(os.listdir(libdir)):
                f = os.path.join(libdir, name)
                if os.path.isfile(f) and not os.path.islink(f) and total < 290 << 20:
                    shutil.copyfile(f, os.path.join(src, name))
                    total += os.path.getsize(f)
            big290 = sh(*in_sid("nix-store", "--add-fixed", "--recursive", "sha256", src), env=nixenv).strip()
            assert sh("nix-store", "--add-fixed", "--recursive", "sha256", src, env=nixenv).strip() == big290
            nar_mib = int(sh("nix-store", "-q", "--size", big290, env=nixenv)) / 2**20
            print(f"~290 MiB path: {big290} (NAR {nar_mib:.0f} MiB)", flush=True)
            subprocess.run(f"nix-store --dump {big290} > /dev/null", shell=True, check=True, env=nixenv)

            n234_rows = []

            def three(name, n28, n234, nq, note=""):
                line = (f"{name:<34} nix 2.8 {n28:>7.2f} s   nix 2.34 {n234:>7.2f} s   narq {nq:>7.2f} s   "
                        f"2.34/narq {n234 / nq:>5.2f}x  2.8/narq {n28 / nq:>5.2f}x  {note}")
                n234_rows.append(line)
                rows.append(line)
                print(line, flush=True)

            # Loopback.
            # Where the CPU goes (two cores): the uploader's own, and the server's for it.
            n28_t, _ = nix_copy("n28-small", top)
            s0 = requests_and_cpu()[1]
            n234_t, _ = nix234_copy("n234-small", top)
            s1, n234_cpu = requests_and_cpu()[1], LAST["cpu"]
            env = fresh_narq("narq-n234-small", sid=True)
            c0, s2 = daemon_cpu(), requests_and_cpu()[1]
            narq_t = narq_push(env, top, sid=True)
            c1, s3_cpu = daemon_cpu(), requests_and_cpu()[1]
            three(f"300 small paths ({SERVER})", n28_t, n234_t, narq_t,
                  f"CPU s: nix 2.34 {n234_cpu:.2f} + its server {s1 - s0:.2f}, narq {c1 - c0:.2f} + its server {s3_cpu - s2:.2f}")
            t = time.perf_counter()
            subprocess.run(f"nix-store --dump {big290} | zstd -T0 -{ZSTD_LEVEL} | sha256sum", shell=True, check=True,
                           capture_output=True, env=nixenv)
            limit = time.perf_counter() - t
            n28_t, _ = nix_copy("n28-big", big290)
            n234_t, n234_rss = nix234_copy("n234-big", big290)
            env = fresh_narq("narq-n234-big", sid=True)
            narq_t = narq_push(env, big290, sid=True)
            peak = daemon_peak()
            # What the temporary key costs: the server-side copy (and delete) that moves the
            # streamed NAR to its name, timed here once more on its own.
            nar = next(o for o in s3.list_objects_v2(Bucket="narq-n234-big")["Contents"] if o["Key"].startswith("nar/"))
            t = time.perf_counter()
            s3.copy_object(Bucket="narq-n234-big", Key="narq/tmp/copy-cost", CopySource={"Bucket": "narq-n234-big", "Key": nar["Key"]})
            s3.delete_object(Bucket="narq-n234-big", Key="narq/tmp/copy-cost")
            copy_t = time.perf_counter() - t
            three(f"~290 MiB path ({SERVER})", n28_t, n234_t, narq_t,
                  f"limit {limit:.2f} s (narq/limit {narq_t / limit:.2f}x); copy+delete of the {nar['Size'] / 2**20:.0f} MiB NAR "
                  f"{copy_t:.2f} s; peak RSS nix 2.34 {n234_rss / 1024:.0f} MiB, narq {peak:.0f} MiB")
            stop_daemon()
            # The slow link (50 ms round trips, 50 MiB/s).
            link = SlowLink(port)
            nix_link = SlowLink(nix_port) if nix_port != port else link
            n234_t, _ = nix234_copy("n234-slow", top, via=nix_link.port)
            s3.create_bucket(Bucket="narq-n234-slow")
            env = fresh_narq("narq-n234-slow", f"s3://narq-n234-slow?endpoint=127.0.0.1:{link.port}&scheme=http&compression=zstd", sid=True)
            narq_t = narq_push(env, top, sid=True)
            line = f"{'300 small paths, slow link':<34} nix 2.34 {n234_t:>7.2f} s   narq {narq_t:>7.2f} s   2.34/narq {n234_t / narq_t:>5.2f}x"
            rows.append(line)
            print(line, flush=True)
            n234_t, _ = nix234_copy("n234-slowbig", big290, via=nix_link.port)
            s3.create_bucket(Bucket="narq-n234-slowbig")
            env = fresh_narq("narq-n234-slowbig", f"s3://narq-n234-slowbig?endpoint=127.0.0.1:{link.port}&scheme=http&compression=zstd", sid=True)
            narq_t = narq_push(env, big290, sid=True)
            stop_daemon()
            info = next(o for o in s3.list_objects_v2(Bucket="narq-n234-slowbig")["Contents"] if o["Key"].startswith("nar/"))
            line = (f"{'~290 MiB path, slow link':<34} nix 2.34 {n234_t:>7.2f} s   narq {narq_t:>7.2f} s   2.34/narq {n234_t / narq_t:>5.2f}x  "
                    f"(link limit {info['Size'] / SlowLink.RATE:.2f} s)")
            rows.append(line)
            print(line, flush=True)
            link.stop()
            nix_link.stop()
            for p in (big290,):
                subprocess.run(["nix-store", "--delete", p], capture_output=True, env=nixenv)
                subprocess.run(in_sid("nix-store", "--delete", p), capture_output=True, env=nixenv)

        print("\n".join(["", "summary:"] + rows))
    finally:
        d = state["daemon"]
        if d:
            d.terminate()
            d.wait()
        moto.stop()
        if big and os.environ.get("NARQ_BENCH_KEEP_BIG") != "1":
            subprocess.run(["nix-store", "--delete", big], capture_output=True, env=nixenv)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
