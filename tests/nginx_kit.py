"""A real nginx running deploy/nginx.conf in a temporary prefix, in front of a test's web server.

Only what cannot run in a test is changed: the addresses (free local ports, the test's gunicorn
as the upstream), a self-signed certificate, paths for logs and temporary files under the
prefix, and, when a test asks, shorter client timeouts. Every change is checked to apply.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from web_kit import ROOT, free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def ensure_nginx() -> str:
    """Return nginx's path, installing Debian's nginx-light when it is missing and we can."""
    if Path(NGINX).exists():
        return NGINX
    reason = "no apt-get, or not root"
    if shutil.which("apt-get") and os.geteuid() == 0:
        # An old package list makes the first install fail: update it, then try again.
        for step in (["install", "nginx-light"], ["update"], ["install", "nginx-light"]):
            done = subprocess.run(["apt-get", "-y", "-q", *step], capture_output=True, text=True,
                                  timeout=900)
            if Path(NGINX).exists():
                return NGINX
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or [str(done.returncode)]
    pytest.skip(f"nginx is absent and `apt-get install -y nginx-light` failed: {reason}")


def self_signed(where: Path) -> tuple[Path, Path]:
    """Write a certificate for localhost/127.0.0.1 and its key; return their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = where / "fullchain.pem", where / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _swap(text: str, old: str, new: str) -> str:
    assert old in text, f"deploy/nginx.conf no longer contains {old!r}"
    return text.replace(old, new)


class Nginx:
    """deploy/nginx.conf served by a real nginx on a free port, proxying to `upstream_port`."""

    def __init__(self, prefix: Path, upstream_port: int, body_timeout: str = "30s") -> None:
        self.prefix, self.port = prefix, free_port()
        self.url = f"https://localhost:{self.port}"
        self.cert, key = self_signed(prefix)
        text = (ROOT / "deploy" / "nginx.conf").read_text()
        for old, new in (("server web:8000", f"server 127.0.0.1:{upstream_port}"),
                         ("listen 80;", f"listen 127.0.0.1:{free_port()};"),
                         ("listen 443 ssl http2;", f"listen 127.0.0.1:{self.port} ssl http2;"),
                         ("/etc/nginx/certs/fullchain.pem", str(self.cert)),
                         ("/etc/nginx/certs/privkey.pem", str(key)),
                         ("/var/log/nginx/access.log", str(prefix / "access.log")),
                         ("client_body_timeout 30s;", f"client_body_timeout {body_timeout};"),
                         ("http {", f"http {{\n    client_body_temp_path {prefix}/body;\n"
                                    f"    proxy_temp_path {prefix}/proxy;")):
            text = _swap(text, old, new)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(f"user root;\npid {prefix}/nginx.pid;\n"
                             f"error_log {prefix}/error.log;\n{text}")
        self.argv = [ensure_nginx(), "-p", str(prefix), "-c", str(self.conf)]

    def check(self) -> subprocess.CompletedProcess[str]:
        """Run `nginx -t` on the configuration."""
        return subprocess.run([*self.argv, "-t"], capture_output=True, text=True, timeout=30)

    def __enter__(self) -> Nginx:
        self.proc = subprocess.Popen([*self.argv, "-g", "daemon off;"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, (self.prefix / "error.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                assert time.monotonic() < deadline, "nginx did not listen within 20 s"
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then the master
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def tls(self, timeout: float = 10) -> ssl.SSLSocket:
        """Open a TLS connection that trusts the test certificate."""
        context = ssl.create_default_context(cafile=str(self.cert))
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return context.wrap_socket(raw, server_hostname="localhost")
