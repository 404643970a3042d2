"""The local S3 servers the benches share, each on free 127.0.0.1 ports with a boto3 client:
- `Moto`: moto_server from the repo's .venv (scripts/setup.sh);
- `Garage`: a 3-node Garage cluster (replication factor 3, SQLite metadata), the binary
  scripts/setup-garage.sh builds (NARQ_GARAGE names another); node 0's S3 endpoint serves.
`server(name)` starts either ("moto" or "garage"). Both say how narq reaches them (`store`,
`env`), and the CPU seconds (and, moto, the requests) they have served (`requests_and_cpu`)."""
import json, os, shutil, socket, subprocess, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
GARAGE = os.environ.get("NARQ_GARAGE", "/var/cache/narq-test/garage-2.5.0/bin/garage")
S3S_FS = os.environ.get("NARQ_S3S_FS", "/var/cache/narq-test/s3s-fs/bin/s3s-fs")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, what, secs=30):
    for _ in range(secs * 10):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {secs} s")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def s3_client(port, key, secret, region):
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name=region, config=Config(max_pool_connections=64))


class Moto:
    """A running moto_server; `log` is where its request log goes (a path, or None)."""
    name = "moto"
    region = "us-east-1"
    key = ("test", "test")

    def __init__(self, log=None):
        self.port = free_port()
        self.log = log
        out = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([os.path.join(VENV_BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=out, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        try:
            wait_port(self.port, "moto_server")
        except RuntimeError:
            self.stop()
            raise
        self.s3 = s3_client(self.port, *self.key, self.region)

    def create_bucket(self, bucket):
        self.s3.create_bucket(Bucket=bucket)

    def store(self, bucket, port=None):
        return f"s3://{bucket}?endpoint=127.0.0.1:{port or self.port}&scheme=http"

    def env(self):
        return {"AWS_ACCESS_KEY_ID": self.key[0], "AWS_SECRET_ACCESS_KEY": self.key[1], "AWS_EC2_METADATA_DISABLED": "true"}

    def requests_and_cpu(self):
        """Requests in the server's log (needs `log`), and CPU seconds the server has used."""
        n = 0
        if self.log:
            with open(self.log) as f:
                n = sum(1 for l in f if "HTTP/1.1" in l)
        return n, cpu_seconds(self.pid)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class Garage:
    """A 3-node Garage cluster on 127.0.0.1, set up as the tests' (tests/it/garage.rs):
    `port` is node 0's S3 endpoint, every bucket is writable with `key`."""
    name = "garage"
    region = "garage"
    key = ("GK6e617271746573745f6b6579", "6e61727174657374736563726574000000000000000000000000000000000000")

    def __init__(self, log=None, nodes=3):
        if not os.path.exists(GARAGE):
            raise RuntimeError(f"{GARAGE} not found: scripts/setup.sh builds it")
        t = time.perf_counter()
        self.dir = tempfile.mkdtemp(prefix="narq-bench-garage-")
        secret = os.urandom(32).hex()
        self.nodes = []
        for i in range(nodes):
            d = os.path.join(self.dir, f"node{i}")
            os.makedirs(d)
            ports = {k: free_port() for k in ("s3", "rpc", "web", "admin")}
            cfg = os.path.join(d, "garage.toml")
            with open(cfg, "w") as f:
                f.write(f'metadata_dir = "{d}/meta"\ndata_dir = "{d}/data"\ndb_engine = "sqlite"\nreplication_factor = {nodes}\n'
                        f'rpc_bind_addr = "127.0.0.1:{ports["rpc"]}"\nrpc_public_addr = "127.0.0.1:{ports["rpc"]}"\n'
                        f'rpc_secret = "{secret}"\n[s3_api]\ns3_region = "garage"\napi_bind_addr = "127.0.0.1:{ports["s3"]}"\n'
                        f'[s3_web]\nbind_addr = "127.0.0.1:{ports["web"]}"\nroot_domain = ".web.garage.localhost"\n'
                        f'[admin]\napi_bind_addr = "127.0.0.1:{ports["admin"]}"\n')
            out = open(os.path.join(d, "garage.log"), "w")
            proc = subprocess.Popen([GARAGE, "-c", cfg, "server"], stdout=out, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, RUST_LOG="garage=warn"))
            self.nodes.append(dict(ports, cfg=cfg, proc=proc))
        try:
            for i, n in enumerate(self.nodes):
                wait_port(n["rpc"], f"garage node {i}")
            ids = [self.cli(["node", "id", "-q"], node=i).strip() for i in range(nodes)]
            for node_id in ids[1:]:
                self.cli(["node", "connect", node_id])
            for node_id in ids:
                self.cli(["layout", "assign", "-z", "dc1", "-c", "1G", node_id[:16]])
            self.cli(["layout", "apply", "--version", "1"])
            self.cli(["key", "import", "--yes", "-n", "bench", *self.key])
            # Bounded: 300 s, as the tests wait for it to heal.
            for _ in range(1500):
                h = json.loads(self.cli(["json-api", "GetClusterHealth"]) or "{}")
                if h.get("status") == "healthy" and h.get("partitionsAllOk") == h.get("partitions"):
                    break
                time.sleep(0.2)
            else:
                raise RuntimeError(f"the garage cluster was not healthy within 300 s: {h}")
        except Exception:
            self.stop()
            raise
        self.setup_seconds = time.perf_counter() - t
        self.port = self.nodes[0]["s3"]
        self.pid = self.nodes[0]["proc"].pid
        self.s3 = s3_client(self.port, *self.key, self.region)

    def cli(self, args, node=0):
        return subprocess.run([GARAGE, "-c", self.nodes[node]["cfg"], *args], check=True, capture_output=True, text=True).stdout

    def create_bucket(self, bucket):
        self.cli(["bucket", "create", bucket])
        self.cli(["bucket", "allow", "--read", "--write", "--owner", bucket, "--key", self.key[0]])

    def store(self, bucket, port=None):
        return f"s3://{bucket}?endpoint=127.0.0.1:{port or self.port}&scheme=http&region=garage"

    def env(self):
        return {"AWS_ACCESS_KEY_ID": self.key[0], "AWS_SECRET_ACCESS_KEY": self.key[1], "AWS_EC2_METADATA_DISABLED": "true"}

    def requests_and_cpu(self):
        """None for the requests (the test build of Garage has no metrics), and the CPU seconds
        of all nodes."""
        return None, sum(cpu_seconds(node["proc"].pid) for node in self.nodes)

    def stop(self):
        for node in self.nodes:
            node["proc"].terminate()
        for node in self.nodes:
            node["proc"].wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class S3sFs(Moto):
    """s3s-fs (the `s3s` crate's file-system server, Rust): a fast S3 server, so that the
    uploaders and not the server set the pace. Two processes over one root directory: `port`
    checks SigV4 with `key` (narq, boto3), `anon_port` takes unsigned requests (Nix 2.8's
    HTTP PUTs, and Nix 2.34 from Debian, built without AWS credentials). It implements no
    ListMultipartUploads (narq skips that and says so). Installed once, outside the clone:
    `cargo install s3s-fs@0.14.1 --locked --features binary --root /var/cache/narq-test/s3s-fs`
    (0.14.1: later versions need a newer Rust than 1.95)."""
    name = "s3s"
    key = ("bench", "benchsecret")

    def __init__(self, log=None):
        if not os.path.exists(S3S_FS):
            raise RuntimeError(f"{S3S_FS} not found: cargo install s3s-fs@0.14.1 --locked --features binary --root {os.path.dirname(os.path.dirname(S3S_FS))}")
        self.dir = tempfile.mkdtemp(prefix="narq-bench-s3s-")
        self.port, self.anon_port = free_port(), free_port()
        out = open(log, "w") if log else subprocess.DEVNULL
        self.procs = [subprocess.Popen([S3S_FS, "--host", "127.0.0.1", "--port", str(self.port), "--access-key", self.key[0],
                                        "--secret-key", self.key[1], self.dir], stdout=out, stderr=subprocess.STDOUT),
                      subprocess.Popen([S3S_FS, "--host", "127.0.0.1", "--port", str(self.anon_port), self.dir],
                                       stdout=out, stderr=subprocess.STDOUT)]
        self.pid = self.procs[0].pid
        try:
            wait_port(self.port, "s3s-fs")
            wait_port(self.anon_port, "s3s-fs (unsigned)")
        except RuntimeError:
            self.stop()
            raise
        self.s3 = s3_client(self.port, *self.key, self.region)

    # create_bucket, store and env: Moto's (a signed S3 API on `port`).

    def requests_and_cpu(self):
        """None for the requests (s3s-fs logs none), and the CPU seconds of both processes."""
        return None, sum(cpu_seconds(p.pid) for p in self.procs)

    def stop(self):
        for p in self.procs:
            p.terminate()
            p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def server(name, log=None):
    """A started `Moto`, `Garage` or `S3sFs` by name."""
    return {"moto": Moto, "garage": Garage, "s3s": S3sFs}[name](log)
