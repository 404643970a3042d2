#!/usr/bin/env python3
"""narq vs `nix copy` uploading to the same S3 server (moto on 127.0.0.1), in one run.

Nix 2.8 from Debian has no s3:// support, so Nix uploads with HTTP PUTs to
http://127.0.0.1:PORT/BUCKET (moto accepts them); narq uses the S3 API. Both compress with
zstd. Cases:
  1. one ~1 GB store path (/usr/lib/x86_64-linux-gnu added with --add-fixed --recursive):
     wall time, and peak RSS of `nix copy` vs of the narq daemon;
  2. a closure of 300 small paths;
  3. the same closure again (already in the bucket).
Usage: bench/s3_vs_nix_copy.py   (run scripts/setup.sh and cargo build --release first)
moto and boto3 come from the repo's .venv/ (scripts/setup.sh), which runs this script; Nix's
settings from a private NIX_CONF_DIR.
"""
import os, shutil, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NARQ = os.path.join(ROOT, "target", "release", "narq")
VENV = os.path.join(ROOT, ".venv")
if not os.path.exists(os.path.join(VENV, "bin", "moto_server")):
    sys.exit(f"{VENV}/bin/moto_server not found: run scripts/setup.sh")
if os.path.realpath(sys.prefix) != os.path.realpath(VENV):
    os.execv(os.path.join(VENV, "bin", "python"), [os.path.join(VENV, "bin", "python")] + sys.argv)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def timed(args, env=None):
    """Wall seconds and peak RSS (KiB) of a command, via GNU time."""
    t = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%M"] + args, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"{args} failed: {out.stderr}")
    return dt, int(out.stderr.strip().splitlines()[-1])


def main():
    tmp = tempfile.mkdtemp(prefix="narq-s3bench-")
    port = free_port()
    moto = subprocess.Popen([os.path.join(VENV, "bin", "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon = None
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.1)
        import boto3
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
        conf = os.path.join(tmp, "nix")
        os.makedirs(conf)
        with open(os.path.join(conf, "nix.conf"), "w") as f:
            f.write("sandbox = false\nbuild-users-group =\nsubstituters =\nmax-jobs = 8\n")
        nixenv = dict(os.environ, NIX_CONF_DIR=conf)

        big = sh("nix-store", "--add-fixed", "--recursive", "sha256", "/usr/lib/x86_64-linux-gnu", env=nixenv).strip()
        stamp = str(time.time_ns())
        leaf = ('derivation { name = "s3bench-${toString i}-%s"; system = builtins.currentSystem; '
                'builder = "/bin/sh"; args = ["-c" "echo ${toString i} > $out"]; }' % stamp)
        top = sh("nix-build", "--no-out-link", "-E",
                 'let leaf = i: %s; in derivation { name = "s3bench-top-%s"; system = builtins.currentSystem; '
                 'builder = "/bin/sh"; args = ["-c" "echo ${toString (builtins.genList leaf 299)} > $out"]; }'
                 % (leaf, stamp), env=nixenv).strip()
        size = int(sh("du", "-sb", big).split()[0])
        print(f"1 GB case: {big} ({size / 2**20:.0f} MiB); 300-path closure: {top}", flush=True)

        def fresh_narq(bucket):
            nonlocal daemon
            if daemon:
                daemon.terminate()
                daemon.wait()
            s3.create_bucket(Bucket=bucket)
            state = os.path.join(tmp, bucket)
            cfg = os.path.join(tmp, bucket + ".toml")
            with open(cfg, "w") as f:
                f.write(f'state-dir = "{state}"\nsocket = "{state}.sock"\n' + os.environ.get('NARQ_BENCH_EXTRA', '') + '\n'
                        f'store = "s3://{bucket}?endpoint=127.0.0.1:{port}&scheme=http&compression=zstd"\n')
            env = dict(os.environ, NARQ_CONFIG=cfg, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                       AWS_EC2_METADATA_DISABLED="true")
            daemon = subprocess.Popen([NARQ, "daemon"], env=env, stderr=open(state + ".log", "w"))
            for _ in range(100):
                if subprocess.run([NARQ, "status"], env=env, capture_output=True).returncode == 0:
                    break
                time.sleep(0.05)
            return env

        def narq_push(env, path):
            t = time.perf_counter()
            sh(NARQ, "push", "--wait", path, env=env)
            return time.perf_counter() - t

        def daemon_peak():
            with open(f"/proc/{daemon.pid}/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))

        def nix_copy(bucket, path):
            s3.create_bucket(Bucket=bucket)
            return timed(["nix", "--extra-experimental-features", "nix-command", "copy", "--to",
                          f"http://127.0.0.1:{port}/{bucket}?compression=zstd", path], env=nixenv)

        rows = []
        nix_t, nix_rss = nix_copy("nix-big", big)
        env = fresh_narq("narq-big")
        narq_t = narq_push(env, big)
        rows.append(("1 GB path", nix_t, narq_t, f"peak RSS: nix copy {nix_rss / 1024:.0f} MiB, narq daemon {daemon_peak() / 1024:.0f} MiB"))

        nix_t, _ = nix_copy("nix-small", top)
        env = fresh_narq("narq-small")
        narq_t = narq_push(env, top)
        rows.append(("300 small paths", nix_t, narq_t, ""))
        nix_t2, _ = timed(["nix", "--extra-experimental-features", "nix-command", "copy", "--to",
                           f"http://127.0.0.1:{port}/nix-small?compression=zstd", top], env=nixenv)
        narq_t2 = narq_push(env, top)
        rows.append(("300 paths, again", nix_t2, narq_t2, ""))

        print(f"{'case':<18} {'nix copy':>10} {'narq':>10} {'speed-up':>9}")
        for name, n, q, note in rows:
            print(f"{name:<18} {n:>9.2f}s {q:>9.2f}s {n / q:>8.1f}x  {note}")
    finally:
        if daemon:
            daemon.terminate()
            daemon.wait()
        moto.terminate()
        moto.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
