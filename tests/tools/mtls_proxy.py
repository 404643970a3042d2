"""A TLS front for an S3 server (moto) that requires a client certificate (mTLS), for the
test of `tls-certificate`/`tls-private-key`.

Usage: mtls_proxy.py DIR UPSTREAM_PORT LISTEN_PORT

Makes a test CA, a server certificate for 127.0.0.1 and a client certificate in DIR
(ca.pem, client.pem, client.key), then passes every connection that presents a client
certificate signed by that CA on to 127.0.0.1:UPSTREAM_PORT, byte for byte.
"""
import datetime
import ipaddress
import os
import socket
import ssl
import sys
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

out, upstream, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
now = datetime.datetime.now(datetime.timezone.utc)


def cert(name, issuer_name, issuer_key, key, ca=False, san=None):
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def write(name, data):
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)


pem = serialization.Encoding.PEM
key_pem = lambda k: k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
ca = cert("narq-test-ca", "narq-test-ca", ca_key, ca_key, ca=True)
server = cert("127.0.0.1", "narq-test-ca", ca_key, server_key, san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
client = cert("narq-test-client", "narq-test-ca", ca_key, client_key)
write("ca.pem", ca.public_bytes(pem))
write("server.pem", server.public_bytes(pem))
write("server.key", key_pem(server_key))
write("client.pem", client.public_bytes(pem))
write("client.key", key_pem(client_key))

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(os.path.join(out, "server.pem"), os.path.join(out, "server.key"))
ctx.load_verify_locations(os.path.join(out, "ca.pem"))
ctx.verify_mode = ssl.CERT_REQUIRED


def pipe(a, b):
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def serve(raw):
    try:
        conn = ctx.wrap_socket(raw, server_side=True)
    except (ssl.SSLError, OSError):
        raw.close()
        return
    up = socket.create_connection(("127.0.0.1", upstream))
    threading.Thread(target=pipe, args=(up, conn), daemon=True).start()
    pipe(conn, up)


listener = socket.create_server(("127.0.0.1", port))
write("ready", b"")
while True:
    raw, _ = listener.accept()
    threading.Thread(target=serve, args=(raw,), daemon=True).start()
