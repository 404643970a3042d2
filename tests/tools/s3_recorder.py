"""An HTTP proxy in front of an S3 server (moto) that records every request, for tests that
check what narq sends: one JSON line per request with its method, path, Host, body length,
x-amz-storage-class and Content-Encoding.

Usage: s3_recorder.py UPSTREAM_PORT LOG_FILE LISTEN_PORT [FAIL_STATUS]

Takes plain requests (path-style) and proxy requests (absolute URIs, as a client behind
`http_proxy` sends them). A virtual-hosted request (the bucket in the host name) is passed on
path-style. With FAIL_STATUS, every request is answered with that status and not passed on.
"""
import http.client
import http.server
import json
import sys
import threading
import urllib.parse

upstream, log_file, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
fail = int(sys.argv[4]) if len(sys.argv) > 4 else 0
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def handle_any(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        host, path = self.headers.get("Host", ""), self.path
        if path.startswith("http://"):
            u = urllib.parse.urlsplit(path)
            host, path = u.netloc, u.path + ("?" + u.query if u.query else "")
        name = host.rsplit(":", 1)[0]
        if "." in name and not name.replace(".", "").isdigit():
            path = "/" + name.split(".")[0] + path
        record = {
            "method": self.command,
            "path": path,
            "host": host,
            "length": len(body),
            "storage_class": self.headers.get("x-amz-storage-class"),
            "encoding": self.headers.get("Content-Encoding"),
            "copy_source": self.headers.get("x-amz-copy-source"),
        }
        with lock, open(log_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if fail:
            self.send_response(fail)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "expect", "proxy-connection")}
        headers["Host"] = f"127.0.0.1:{upstream}"
        conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=120)
        conn.request(self.command, path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        self.send_response(r.status)
        length = None
        for k, v in r.getheaders():
            if k.lower() == "content-length":
                length = v
            elif k.lower() not in ("transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any


http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
