"""Certificates for TLS termination: one (wildcard) certificate per base domain.

The proxy asks a `CertProvider` for a server `ssl.SSLContext` by base domain and mode;
`StaticCertProvider` holds PEM chains and keys in memory and builds contexts once. The
ACME-backed provider (issue item 6) implements the same protocol.

Usage::

    certs = StaticCertProvider({"app.example.com": (chain_pem, key_pem)})
    ctx = certs.server_context("app.example.com", h2=True)
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Mapping
from typing import Protocol


class CertProvider(Protocol):
    def server_context(self, base_domain: str, *, h2: bool) -> ssl.SSLContext | None:
        """A server context for ``base_domain`` (ALPN ``h2`` offered when ``h2``), or None."""
        ...


def server_context_from_pem(chain_pem: bytes, key_pem: bytes, *, h2: bool) -> ssl.SSLContext:
    """A TLS 1.2+ server context for one certificate chain and key (PEM)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # OpenSSL only loads keys from files: write them to a private directory and remove it.
    with tempfile.TemporaryDirectory(prefix="pydstack-cert-") as tmp:
        chain_path, key_path = os.path.join(tmp, "chain.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((chain_path, chain_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(chain_path, key_path)
    if h2:
        ctx.set_alpn_protocols(["h2"])  # like dstack's `g` acceptor: h2 only
    return ctx


class StaticCertProvider:
    """Certificates given in memory; `set` replaces one base domain's certificate."""

    def __init__(self, certs: Mapping[str, tuple[bytes, bytes]] | None = None) -> None:
        self._contexts: dict[tuple[str, bool], ssl.SSLContext] = {}
        for domain, (chain, key) in (certs or {}).items():
            self.set(domain, chain, key)

    def set(self, base_domain: str, chain_pem: bytes, key_pem: bytes) -> None:
        domain = base_domain.lower().rstrip(".")
        built = {h2: server_context_from_pem(chain_pem, key_pem, h2=h2) for h2 in (False, True)}
        for h2, ctx in built.items():  # both built before either is swapped in
            self._contexts[(domain, h2)] = ctx

    def server_context(self, base_domain: str, *, h2: bool) -> ssl.SSLContext | None:
        return self._contexts.get((base_domain, h2))
