"""The local S3 server the benches share: moto_server from the repo's .venv (scripts/setup.sh)
on a free 127.0.0.1 port, with a boto3 client for it."""
import os, socket, subprocess, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(ROOT, ".venv", "bin")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Moto:
    """A running moto_server; `log` is where its request log goes (a path, or None)."""

    def __init__(self, log=None):
        self.port = free_port()
        self.log = log
        out = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([os.path.join(VENV_BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=out, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        # Bounded: 30 s.
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", self.port)).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError("moto_server did not start within 30 s")
        import boto3
        self.s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.port}", aws_access_key_id="test",
                               aws_secret_access_key="test", region_name="us-east-1")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
