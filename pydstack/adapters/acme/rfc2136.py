"""DNS-01 through RFC 2136 dynamic updates signed with TSIG (RFC 8945), on dnspython.

Any authoritative server that takes signed updates works (Knot, BIND, PowerDNS, ...); the
tests run it against a real ``knotd``. Each verb is one UPDATE message over TCP to the
primary: ``add_txt`` adds the one TXT value, ``remove_txt`` deletes exactly that value (the
two challenges of a wildcard order share a name). The server's answer must be NOERROR and
carry a valid TSIG signature of the same key: whoever answers in the server's place cannot
fake success.
The secret is read from a 0600 file (never argv, never the log)::

    config = Rfc2136Config("127.0.0.1:53", "example.com", "acme-key", "hmac-sha256",
                           "/etc/pydstack/acme-tsig.secret")
    dns = config.open()  # reads the secret file; DnsError if unusable
    await dns.add_txt("_acme-challenge.apps.example.com.", "token-digest")
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import os
import socket
from dataclasses import dataclass

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.update
from dns.rdtypes.ANY.TXT import TXT

from pydstack.adapters.secretfile import SecretFileError, read_secret

from .errors import DnsError

ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1")
TTL_S = 60  # a challenge record lives minutes; resolvers should not keep it longer


@dataclass(frozen=True, slots=True)
class Rfc2136Config:
    """What an operator names: the primary server, the zone the challenge names are in,
    and the TSIG key (its name, algorithm, and a file holding its base64 secret)."""

    server: str  # HOST or HOST:PORT ([V6]:PORT); port 53 when not given
    zone: str
    tsig_name: str
    tsig_algorithm: str
    tsig_secret_file: str
    timeout_s: float = 10.0  # per update, connection included
    propagation_s: float = 0.0  # wait before validation (secondaries still transferring)

    def open(self) -> Rfc2136Dns:
        """The provider, with the secret read and every field checked (one-line DnsError)."""
        host, port = split_server(self.server)
        if self.tsig_algorithm not in ALGORITHMS:
            raise DnsError(f"TSIG algorithm {self.tsig_algorithm!r}: use one of {ALGORITHMS}")
        try:
            zone = dns.name.from_text(self.zone)
            key_name = dns.name.from_text(self.tsig_name)
        except dns.exception.DNSException as exc:
            raise DnsError(f"RFC 2136 zone or TSIG key name: {exc}") from None
        try:
            raw = read_secret(self.tsig_secret_file).strip()
        except SecretFileError as exc:
            raise DnsError(f"TSIG secret: {exc}") from None
        try:
            secret = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            secret = b""
        if len(secret) < 16:
            raise DnsError(
                f"TSIG secret {self.tsig_secret_file}: expected the key's base64 secret "
                "(16 bytes or more, as `keymgr -t` or `tsig-keygen` print it)"
            )
        key = dns.tsig.Key(key_name, secret, self.tsig_algorithm)
        return Rfc2136Dns(
            host, port, zone, key, timeout_s=self.timeout_s, propagation_s=self.propagation_s
        )


def split_server(server: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address -> (host, port)."""
    text = server.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DnsError(f"RFC 2136 server {server!r}: expected HOST, HOST:PORT or [IPv6]:PORT")
    return host, int(port)


class Rfc2136Dns:
    """The DnsProvider of one zone on one primary server, with one TSIG key."""

    def __init__(
        self,
        host: str,
        port: int,
        zone: dns.name.Name,
        key: dns.tsig.Key,
        *,
        timeout_s: float = 10.0,
        propagation_s: float = 0.0,
    ) -> None:
        self.host, self.port, self.zone, self._key = host, port, zone, key
        self.timeout_s = timeout_s
        self.propagation_s = propagation_s

    @property
    def server(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _owner(self, name: str) -> dns.name.Name:
        try:
            owner = dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            raise DnsError(f"RFC 2136: {name!r} is not a DNS name: {exc}") from None
        if not owner.is_subdomain(self.zone):
            raise DnsError(f"{owner} is not in the RFC 2136 zone {self.zone}")
        return owner

    async def add_txt(self, name: str, value: str) -> None:
        owner = self._owner(name)
        update = dns.update.UpdateMessage(self.zone)
        update.add(owner, TTL_S, _txt(value))
        await self._send(update, f"add of TXT {owner}")

    async def remove_txt(self, name: str, value: str) -> None:
        owner = self._owner(name)
        update = dns.update.UpdateMessage(self.zone)
        update.delete(owner, _txt(value))  # this value only; deleting a missing one is NOERROR
        await self._send(update, f"removal of TXT {owner}")

    async def _send(self, update: dns.update.UpdateMessage, what: str) -> None:
        update.use_tsig(self._key)
        request = update.to_wire()  # also sets update.mac, which the answer's signature covers
        where = f"RFC 2136 {what} on {self.server}"
        try:
            async with asyncio.timeout(self.timeout_s):
                wire = await _exchange(self.host, self.port, request)
        except TimeoutError:
            raise DnsError(f"{where}: no answer within {self.timeout_s:g} s") from None
        except asyncio.IncompleteReadError:
            raise DnsError(f"{where}: the server closed the connection without an answer") from None
        except socket.gaierror as exc:
            raise DnsError(f"{where}: cannot resolve {self.host}: {exc.strerror}") from None
        except OSError as exc:  # refused, unreachable
            reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's is verbose
            raise DnsError(f"{where}: {reason}") from None
        try:
            answer = dns.message.from_wire(wire, keyring=update.keyring, request_mac=update.mac)
        except dns.exception.DNSException as exc:  # unsigned, badly signed, or not DNS at all
            raise DnsError(f"{where}: {_unverified(wire, exc, self._key)}") from None
        if not update.is_response(answer):
            raise DnsError(f"{where}: the answer is not to this update")
        rcode = answer.rcode()
        if rcode != dns.rcode.NOERROR:
            raise DnsError(f"{where}: the server answered {dns.rcode.to_text(rcode)}")


async def _exchange(host: str, port: int, request: bytes) -> bytes:
    """One DNS message over TCP (RFC 1035 4.2.2: each prefixed by its 2-byte length)."""
    reader, writer = await asyncio.open_connection(await _address(host, port), port)
    try:
        writer.write(len(request).to_bytes(2, "big") + request)
        await writer.drain()
        size = int.from_bytes(await reader.readexactly(2), "big")
        return await reader.readexactly(size)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _unverified(wire: bytes, exc: dns.exception.DNSException, key: dns.tsig.Key) -> str:
    """Why an answer that did not verify was refused, with the rcode it claims (read without
    its signature: only ever shown in an error, never taken as success)."""
    try:
        claimed = dns.rcode.to_text(dns.message.from_wire(wire, keyring=False).rcode())
    except dns.exception.DNSException:
        return f"an answer that is not DNS ({exc})"
    if isinstance(exc, dns.tsig.PeerError):
        return f"{claimed} ({_tsig_why(exc, key)})"
    return f"the server answered {claimed} without a valid TSIG signature ({exc})"


def _txt(value: str) -> TXT:
    # built as rdata, never parsed from text: a value cannot smuggle quotes or more strings
    return TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [value.encode()])


def _tsig_why(exc: dns.tsig.PeerError, key: dns.tsig.Key) -> str:
    named = f"TSIG key {key.name} ({key.algorithm.to_text(omit_final_dot=True)})"
    if isinstance(exc, dns.tsig.PeerBadSignature):
        return f"BADSIG: the server knows {named} with another secret"
    if isinstance(exc, dns.tsig.PeerBadKey):
        return f"BADKEY: the server does not know {named} or lets it update nothing here"
    if isinstance(exc, dns.tsig.PeerBadTime):
        return "BADTIME: this host's clock and the server's differ by more than 5 minutes"
    return f"{type(exc).__name__}: {exc}"


async def _address(host: str, port: int) -> str:
    """An IP address for ``host`` (dnspython sends to addresses only)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return str(infos[0][4][0])
