"""Mutual RA-TLS for aiohttp: SSL contexts, a server middleware and a client connector.

TLS checks the certificate chain (to the CA that issues RA-TLS certificates, e.g. a dstack
app CA or the KMS root); after the handshake we check the peer's attestation with
`RaTlsVerifier`. Hostnames are not checked: identity comes from the attestation.

    verifier = RaTlsVerifier(collateral_source, root_ca_der=dev_root)
    ctx = server_ssl_context(cert_chain_pem, key_pem, ca_pem)
    app = web.Application(middlewares=[ratls_middleware(verifier)])
    ...
    conn = RaTlsConnector(verifier, ssl=client_ssl_context(chain, key, ca_pem))
    async with aiohttp.ClientSession(connector=conn) as s: ...
    request[RATLS_PEER].app_info          # in a handler: the verified peer's identity
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509

from .ratls import (
    CollateralSource,
    RaTlsError,
    RaTlsResult,
    check_ratls_cert,
    collateral_for_cert,
    special_usage,
)
from .verify import Policy

RATLS_PEER: web.RequestKey[RaTlsResult] = web.RequestKey("ratls_peer", RaTlsResult)


class RaTlsVerifier:
    """Checks peer certificates; caches results per certificate for `cache_seconds`.

    The cache matters because every TLS connection presents the same certificate and a
    check costs a dcap-qvl verification (and maybe a collateral fetch). `usage`: the dstack
    special usage the certificate must name (e.g. `kms:rpc`), checked before its evidence.
    """

    def __init__(
        self,
        collateral: CollateralSource,
        *,
        policy: Policy | None = None,
        root_ca_der: bytes | None = None,
        clock: Callable[[], float] = time.time,
        cache_seconds: float = 300.0,
        usage: str | None = None,
    ) -> None:
        self.usage = usage
        self._collateral = collateral
        self._policy = policy
        self._root = root_ca_der
        self._clock = clock
        self._ttl = cache_seconds
        self._cache: dict[bytes, tuple[float, RaTlsResult]] = {}

    @property
    def root_ca_der(self) -> bytes | None:
        """The root quotes must chain to (None: Intel's; set: a simulator's dev PKI)."""
        return self._root

    async def verify_der(self, cert_der: bytes) -> RaTlsResult:
        key = hashlib.sha256(cert_der).digest()
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        if self.usage is not None:
            wrong = _usage_reason(cert_der, self.usage)
            if wrong:
                return RaTlsResult(False, (wrong,), b"")
        try:
            coll = await collateral_for_cert(cert_der, self._collateral)
        except RaTlsError as e:
            return RaTlsResult(False, (str(e),), b"")
        result = check_ratls_cert(
            cert_der, coll, now=int(now), policy=self._policy, root_ca_der=self._root
        )
        if len(self._cache) > 1024:
            self._cache.clear()  # bounded; a miss only costs a re-check
        self._cache[key] = (now, result)
        return result


def _usage_reason(cert_der: bytes, usage: str) -> str:
    """Why the certificate does not name special usage `usage` ('' when it does)."""
    try:
        found = special_usage(x509.load_der_x509_certificate(cert_der))
    except (ValueError, RaTlsError) as e:
        return f"not an RA-TLS certificate: {e}"
    if found != usage:
        return f"certificate usage is {found!r}, not {usage!r}"
    return ""


@contextlib.contextmanager
def _pem_files(chain_pem: str, key_pem: str) -> Iterator[tuple[str, str]]:
    # ssl.load_cert_chain reads only from paths; memfd keeps the key off any filesystem.
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("ratls-chain"), os.memfd_create("ratls-key")]
        try:
            for fd, text in zip(fds, (chain_pem, key_pem), strict=True):
                os.write(fd, text.encode())
            yield (f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory() as d:
        paths = (os.path.join(d, "chain.pem"), os.path.join(d, "key.pem"))
        for path, text in zip(paths, (chain_pem, key_pem), strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        yield paths


def _context(purpose: ssl.Purpose, chain_pem: str, key_pem: str, ca_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
    if purpose is ssl.Purpose.SERVER_AUTH:
        ctx.check_hostname = False  # the attestation, not a DNS name, identifies the peer
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: the server demands a client certificate
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with _pem_files(chain_pem, key_pem) as (chain_path, key_path):
        ctx.load_cert_chain(chain_path, key_path)
    ctx.load_verify_locations(cadata=ca_pem)
    return ctx


def server_ssl_context(chain_pem: str, key_pem: str, ca_pem: str) -> ssl.SSLContext:
    """Server side of mutual RA-TLS: own chain, requires a client cert issued under `ca_pem`."""
    return _context(ssl.Purpose.CLIENT_AUTH, chain_pem, key_pem, ca_pem)


def client_ssl_context(chain_pem: str, key_pem: str, ca_pem: str) -> ssl.SSLContext:
    """Client side: presents its chain, accepts servers issued under `ca_pem`."""
    return _context(ssl.Purpose.SERVER_AUTH, chain_pem, key_pem, ca_pem)


def peer_cert_der(transport: asyncio.BaseTransport | None) -> bytes | None:
    if transport is None:
        return None
    obj = transport.get_extra_info("ssl_object")
    if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
        return None
    der = obj.getpeercert(binary_form=True)
    return der if der else None


def peer_chain_der(transport: asyncio.BaseTransport | None) -> list[bytes]:
    """The peer's chain as TLS verified it, leaf first, trust anchor last ([] without one).

    Python 3.13 has `SSLObject.get_verified_chain`; 3.10-3.12 have it on the C object."""
    if transport is None:
        return []
    obj = transport.get_extra_info("ssl_object")
    if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
        return []
    public = getattr(obj, "get_verified_chain", None)
    if public is not None:
        return [bytes(c) for c in public() or []]
    chain = obj._sslobj.get_verified_chain()  # type: ignore[union-attr]  # 3.11: not public yet
    return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain or []]  # type: ignore[attr-defined]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def ratls_middleware(verifier: RaTlsVerifier) -> Any:
    """aiohttp middleware: 403 unless the client's certificate carries valid evidence."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        der = peer_cert_der(request.transport)
        if der is None:
            return web.json_response({"error": "RA-TLS client certificate required"}, status=403)
        result = await verifier.verify_der(der)
        if not result.ok:
            return web.json_response(
                {"error": "RA-TLS peer refused", "reasons": list(result.reasons)}, status=403
            )
        request[RATLS_PEER] = result
        return await handler(request)

    return middleware


class RaTlsPeerRefused(aiohttp.ClientConnectionError):
    """The server's certificate did not carry acceptable RA-TLS evidence."""

    def __init__(self, result: RaTlsResult) -> None:
        super().__init__("RA-TLS server refused: " + "; ".join(result.reasons))
        self.result = result


class RaTlsConnector(aiohttp.TCPConnector):
    """TCP connector that checks the server's attestation before any request byte is sent."""

    def __init__(self, verifier: RaTlsVerifier, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._verifier = verifier

    # aiohttp has no public post-handshake hook; `_create_connection` (stable through 3.x)
    # returns the connected protocol before the request is written.
    async def _create_connection(
        self,
        req: Any,
        traces: Any,
        timeout: Any,
    ) -> Any:
        proto = await super()._create_connection(req, traces, timeout)
        der = peer_cert_der(proto.transport)
        if der is None:
            proto.close()
            raise RaTlsPeerRefused(RaTlsResult(False, ("server sent no certificate",), b""))
        result = await self._verifier.verify_der(der)
        if not result.ok:
            proto.close()
            raise RaTlsPeerRefused(result)
        return proto
