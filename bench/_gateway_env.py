"""Fixtures of bench.gateway: certificates, the nginx backend, the reference proxies
(nginx ``stream``, HAProxy with a static config), wrk runs and their parsing.

wrk takes the TLS server name from the URL's host and resolves it, and our names
(``b1-8080.app.example.test``) resolve nowhere: wrk runs in a private mount namespace
(``unshare -m``, root) with a bind-mounted hosts file that points them at 127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

BASE = "app.example.test"
NGINX_STREAM = "/usr/lib/nginx/modules/ngx_stream_module.so"


def issue(names: list[str]) -> tuple[bytes, bytes]:
    """A self-signed (chain PEM, key PEM) for ``names``; wrk does not verify."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@dataclass
class Child:
    """A reference server process; stopped with SIGTERM (then SIGKILL)."""

    name: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def nginx(tmp: Path, name: str, body: str) -> Child:
    """nginx in the foreground with ``body`` (http/stream blocks) under a private prefix."""
    root = tmp / name
    (root / "logs").mkdir(parents=True, exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(
        f"load_module {NGINX_STREAM};\n"
        "worker_processes 1;\ndaemon off;\nerror_log stderr error;\n"
        f"pid {root}/nginx.pid;\nevents {{ worker_connections 16384; }}\n{body}\n"
    )
    proc = subprocess.Popen(
        ["nginx", "-p", str(root), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "stderr.log", "wb"),
    )
    return Child(name, proc)


def backend_nginx(tmp: Path, ip: str, http_port: int, tls_port: int, pem: Path) -> Child:
    """The app: a 13-byte answer over plain HTTP (termination) and HTTPS (passthrough)."""
    tmpdirs = " ".join(
        f"{k}_temp_path {tmp}/backend/{k};"
        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    answer = "location / { return 200 'hello, world\\n'; }"
    return nginx(
        tmp,
        "backend",
        "http {\n access_log off;\n keepalive_requests 1000000;\n" + tmpdirs + "\n"
        f" server {{ listen {ip}:{http_port} backlog=4096; {answer} }}\n"
        f" server {{ listen {ip}:{tls_port} ssl backlog=4096; ssl_certificate {pem};"
        f" ssl_certificate_key {pem}; {answer} }}\n}}",
    )


def stream_nginx(
    tmp: Path, pass_port: int, term_port: int, ip: str, http_port: int, tls_port: int, pem: Path
) -> Child:
    """nginx ``stream``: ssl_preread passthrough on one port, TLS termination on another."""
    return nginx(
        tmp,
        "stream",
        "stream {\n"
        f" server {{ listen 127.0.0.1:{pass_port} backlog=4096; ssl_preread on;"
        f" proxy_pass {ip}:{tls_port}; }}\n"
        f" server {{ listen 127.0.0.1:{term_port} ssl backlog=4096; ssl_certificate {pem};"
        f" ssl_certificate_key {pem}; ssl_protocols TLSv1.2 TLSv1.3;"
        f" proxy_pass {ip}:{http_port}; }}\n}}",
    )


def static_haproxy(tmp: Path, port: int, names: dict[str, str], pem: Path) -> Child:
    """HAProxy with a static config of the same shape as the plane's: one port, SNI
    routing, passthrough from the front, termination behind a unix-socket hop.
    ``names``: server name -> "pass ip:port" or "term ip:port"."""
    root = tmp / "haproxy-static"
    root.mkdir(exist_ok=True)
    sock = root / "term.sock"
    rules, backends = [], []
    for i, (name, target) in enumerate(sorted(names.items())):
        kind, addr = target.split()
        if kind == "pass":
            rules.append(f"    use_backend p{i} if {{ req.ssl_sni -i {name} }}")
            backends.append(f"backend p{i}\n    server s {addr}\n")
        else:
            rules.append(f"    use_backend to_term if {{ req.ssl_sni -i {name} }}")
            backends.append(f"backend t{i}\n    server s {addr}\n")
            term_backend = f"t{i}"
    conf = root / "haproxy.cfg"
    conf.write_text(
        "global\n    nbthread 1\n    tune.ssl.default-dh-param 2048\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 600s\n"
        "    timeout server 600s\n    retries 0\n"
        f"frontend fe\n    bind 127.0.0.1:{port}\n    tcp-request inspect-delay 5s\n"
        "    tcp-request content accept if { req.ssl_hello_type 1 }\n" + "\n".join(rules) + "\n"
        f"frontend term\n    bind unix@{sock} accept-proxy ssl crt {pem}\n"
        f"    default_backend {term_backend}\n"
        f"backend to_term\n    server s unix@{sock} send-proxy-v2\n" + "".join(backends)
    )
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "stderr.log", "wb"),
    )
    return Child("haproxy-static", proc)


@dataclass(frozen=True)
class WrkResult:
    rps: float  # wrk's figure: every answer, a non-2xx/3xx one too
    p99_ms: float
    errors: int  # socket errors (connect, read, write, timeout) + non-2xx/3xx answers
    requests: int = 0  # answers wrk counted, non-2xx/3xx ones included
    socket_errors: int = 0

    @property
    def attempts(self) -> int:
        """Requests tried: answered, or lost to a socket error."""
        return self.requests + self.socket_errors


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(out: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    requests = re.search(r"^\s*(\d+) requests in ", out, re.M)
    if rps is None or p99 is None or requests is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    socket = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = socket + (int(non2xx[1]) if non2xx else 0)
    return WrkResult(float(rps[1]), float(p99[1]) * _UNITS[p99[2]], errors,
                     requests=int(requests[1]), socket_errors=socket)  # fmt: skip


def wrk(hosts: Path, url: str, seconds: float, connections: int, *, new_conn: bool) -> WrkResult:
    """wrk -t1 against ``url`` with ``hosts`` as /etc/hosts (private mount namespace)."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--latency"]
    if new_conn:
        args += ["-H", "Connection: close"]
    script = f'mount --bind {hosts} /etc/hosts && exec "$@"'
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}{done.stdout}")
    return parse_wrk(done.stdout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its children still running (nginx's workers)."""
    total = 0.0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total + sum(cpu_seconds(int(c)) for c in children)


def preflight() -> str | None:
    """Why the bench cannot run here, or None."""
    for tool in ("wrk", "nginx", "haproxy", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is missing: run `make sysdeps` (Debian: haproxy nginx wrk)"
    if not Path(NGINX_STREAM).exists():
        return "nginx stream module missing: apt-get install libnginx-mod-stream"
    if os.geteuid() != 0:
        return "needs root for `unshare -m` (wrk resolves names through a private hosts file)"
    return None
