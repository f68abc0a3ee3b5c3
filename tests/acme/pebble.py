"""Real pebble (ACME test CA) and pebble-challtestsrv (its DNS) on free loopback ports.

Pebble serves ACME over HTTPS only, so the fixture makes a throw-away CA for pebble's own
listener and hands its PEM path to the client (``ca_bundle``). The certificates pebble issues
chain to a root it generates at start, fetched from its management API (``/roots/0``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pydstack.adapters.ports import free_port

BINARIES = ("pebble", "pebble-challtestsrv")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _listener_pki(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """(CA PEM, leaf chain PEM, leaf key PEM) for pebble's HTTPS listener on ``host``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble listener test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost")]
        + [x509.IPAddress(ipaddress.ip_address(a)) for a in sorted({"127.0.0.1", host})]
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@dataclass(frozen=True)
class Pebble:
    directory_url: str  # the ACME directory
    management_url: str  # pebble's management API (roots, intermediates)
    challtestsrv_url: str  # pebble-challtestsrv's management API (/set-txt, /clear-txt)
    ca_bundle: str  # PEM that pebble's HTTPS listener chains to
    logs: Path

    async def root_pem(self, index: int = 0) -> bytes:
        """The root the issued certificates chain to (pebble makes a new one per run)."""
        ctx = ssl.create_default_context(cafile=self.ca_bundle)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.management_url}/roots/{index}", ssl=ctx) as resp,
        ):
            resp.raise_for_status()
            return await resp.read()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


async def _wait_port(
    port: int, proc: asyncio.subprocess.Process, log: Path, host: str = "127.0.0.1"
) -> None:
    for _ in range(200):
        if proc.returncode is not None:
            raise RuntimeError(f"{log.name} exited: {_tail(log)}")
        try:
            _, w = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        w.close()
        return
    raise RuntimeError(f"port {port} never opened; see {log}")


@contextlib.asynccontextmanager
async def running_pebble(
    tmp: Path, *, validity_s: int = 0, host: str = "127.0.0.1", dns_server: str = ""
) -> AsyncIterator[Pebble]:
    """pebble + pebble-challtestsrv, stopped (SIGTERM, then awaited) when the block exits.

    ``validity_s`` sets ``certificateValidityPeriod`` (0 = pebble's default); ``host`` is
    where the ACME and management APIs listen (a test LAN's host address for nodes in
    namespaces; the DNS server pebble validates against stays on loopback). ``dns_server``
    (``IP:PORT``): pebble validates DNS-01 against that real server instead, and no
    challtestsrv runs (``challtestsrv_url`` is "")."""
    ca, cert, key = _listener_pki(tmp, host)
    acme_port, mgmt_port, dns_port, cts_port = (free_port() for _ in range(4))
    conf: dict[str, object] = {
        "listenAddress": f"{host}:{acme_port}",
        "managementListenAddress": f"{host}:{mgmt_port}",
        "certificate": str(cert),
        "privateKey": str(key),
        "httpPort": free_port(),  # unused: DNS-01 only
        "tlsPort": free_port(),
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }
    if validity_s:
        conf["certificateValidityPeriod"] = validity_s
    config = tmp / "pebble.json"
    config.write_text(json.dumps({"pebble": conf}))
    env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
    procs: list[asyncio.subprocess.Process] = []
    try:
        if not dns_server:
            cts_log = tmp / "challtestsrv.log"
            with cts_log.open("wb") as out:
                cts = await asyncio.create_subprocess_exec(
                    "pebble-challtestsrv",
                    "-dns01", f"127.0.0.1:{dns_port}",
                    "-http01", "", "-https01", "", "-tlsalpn01", "",
                    "-management", f"{host}:{cts_port}",
                    stdout=out, stderr=out, env=env,
                )  # fmt: skip
            procs.append(cts)
            await _wait_port(cts_port, cts, cts_log, host)
        pebble_log = tmp / "pebble.log"
        with pebble_log.open("wb") as out:
            peb = await asyncio.create_subprocess_exec(
                "pebble", "-config", str(config),
                "-dnsserver", dns_server or f"127.0.0.1:{dns_port}",
                stdout=out, stderr=out, env=env,
            )  # fmt: skip
        procs.append(peb)
        await _wait_port(acme_port, peb, pebble_log, host)
        await _wait_port(mgmt_port, peb, pebble_log, host)
        yield Pebble(
            directory_url=f"https://{host}:{acme_port}/dir",
            management_url=f"https://{host}:{mgmt_port}",
            challtestsrv_url="" if dns_server else f"http://{host}:{cts_port}",
            ca_bundle=str(ca),
            logs=tmp,
        )
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 5)
            except TimeoutError:
                p.kill()
                await p.wait()
