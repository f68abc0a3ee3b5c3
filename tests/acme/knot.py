"""A real authoritative DNS server (Knot DNS, Debian package ``knot``) on a free loopback
port: its own config, zone file, TSIG key and databases in a temp dir, stopped and awaited
when the block exits. It takes RFC 2136 updates of TXT records signed with the key, as a
zone's primary would for an ACME client, and answers pebble's DNS-01 lookups.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.message
import dns.rdatatype

from pydstack.adapters.acme.rfc2136 import Rfc2136Config
from pydstack.adapters.ports import bindable, free_port
from pydstack.adapters.secretfile import write_secret

KNOTD = "knotd"
KEY_NAME = "acme-update."
ALGORITHM = "hmac-sha256"


def missing_knot() -> bool:
    return shutil.which(KNOTD) is None and not Path("/usr/sbin/knotd").exists()


def _knotd() -> str:
    return shutil.which(KNOTD) or "/usr/sbin/knotd"


def free_dns_port() -> int:
    """A port free for both UDP (pebble's lookups) and TCP (our updates)."""
    for _ in range(50):
        port = free_port()
        if bindable("127.0.0.1", port, socket.SOCK_DGRAM):
            return port
    raise OSError("no port free for both UDP and TCP")


@dataclass(frozen=True)
class Knot:
    address: str  # 127.0.0.1:PORT, for pebble's -dnsserver and our updates
    zone: str
    secret_file: Path  # the TSIG key's base64 secret, 0600
    log: Path

    def config(self, **change: str) -> Rfc2136Config:
        """The RFC 2136 options an operator would give for this server (fields overridable)."""
        fields = dict(server=self.address, zone=self.zone, tsig_name=KEY_NAME,
                      tsig_algorithm=ALGORITHM, tsig_secret_file=str(self.secret_file))  # fmt: skip
        fields.update(change)
        return Rfc2136Config(**fields)  # type: ignore[arg-type]

    async def txt(self, name: str) -> list[str]:
        """The TXT values the server answers for ``name`` right now."""
        host, port = self.address.rsplit(":", 1)
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        answer = await dns.asyncquery.udp(query, host, timeout=3, port=int(port))
        return sorted(
            b"".join(rd.strings).decode()
            for rrset in answer.answer
            if rrset.rdtype == dns.rdatatype.TXT
            for rd in rrset
        )


def _config(tmp: Path, port: int, zone: str, secret_b64: str) -> str:
    # The key may add and delete TXT records only: a stolen key cannot move the zone's A records.
    return f"""\
server:
    rundir: "{tmp}/run"
    listen: 127.0.0.1@{port}
database:
    storage: "{tmp}/db"
key:
  - id: {KEY_NAME}
    algorithm: {ALGORITHM}
    secret: {secret_b64}
acl:
  - id: acme-update
    key: {KEY_NAME}
    action: update
    update-type: [TXT]
log:
  - target: stderr
    any: info
template:
  - id: default
    storage: "{tmp}/zones"
    zonefile-sync: -1
    journal-content: all
zone:
  - domain: {zone}
    acl: acme-update
"""


@contextlib.asynccontextmanager
async def running_knot(tmp: Path, zone: str = "example.com.") -> AsyncIterator[Knot]:
    for sub in ("run", "db", "zones"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    secret = base64.b64encode(os.urandom(32)).decode()
    secret_file = write_secret(tmp / "tsig.secret", secret + "\n")
    (tmp / "zones" / f"{zone}zone").write_text(
        f"$ORIGIN {zone}\n$TTL 60\n"
        "@ SOA ns1 hostmaster 1 3600 600 86400 60\n@ NS ns1\nns1 A 127.0.0.1\n"
    )
    port = free_dns_port()
    conf = tmp / "knot.conf"
    write_secret(conf, _config(tmp, port, zone, secret))  # holds the secret too
    log = tmp / "knotd.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            _knotd(), "-c", str(conf), stdout=out, stderr=out
        )
    try:
        knot = Knot(f"127.0.0.1:{port}", zone, secret_file, log)
        await _wait_serving(knot, proc)
        yield knot
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _wait_serving(knot: Knot, proc: asyncio.subprocess.Process) -> None:
    """Until the zone answers (knotd binds first and loads zones after)."""
    for _ in range(100):
        if proc.returncode is not None:
            raise RuntimeError(f"knotd exited: {knot.log.read_text(errors='replace')[-2000:]}")
        try:
            host, port = knot.address.rsplit(":", 1)
            query = dns.message.make_query(knot.zone, dns.rdatatype.SOA)
            answer = await dns.asyncquery.udp(query, host, timeout=0.5, port=int(port))
            if answer.answer:
                return
        except (TimeoutError, OSError, dns.exception.DNSException):
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"knotd never served {knot.zone}; see {knot.log}")
