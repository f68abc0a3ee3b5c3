"""The proxy's certificates, from the log: a ``CertProvider`` over the folded cert state.

``LogCertProvider`` implements the proxy's ``CertProvider`` protocol
(``server_context(base_domain, *, h2)``). ``update(state)`` is called after each fold; it
unseals a certificate's key once, builds both server contexts (with and without ALPN h2)
before swapping them in, and leaves unchanged domains alone, so the handshake path only does a
dict lookup. Usage::

    provider = LogCertProvider(CertStore(cluster_key))
    provider.update(view.state)
    ctx = provider.server_context("example.com", h2=False)
"""

from __future__ import annotations

import os
import ssl
import tempfile

import structlog

from pydstack.core.gateway.certs import CertState, CertStore
from pydstack.core.gateway.sealing import SealError

_log = structlog.get_logger("pydstack.gateway.certs")


def server_context(chain_pem: bytes, key_pem: bytes, *, h2: bool) -> ssl.SSLContext:
    """A TLS 1.2+ server context for one chain and key (PEM)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # OpenSSL loads keys only from files: a private directory, removed at once.
    with tempfile.TemporaryDirectory(prefix="pydstack-cert-") as tmp:
        chain_path, key_path = os.path.join(tmp, "chain.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((chain_path, chain_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(chain_path, key_path)
    if h2:
        ctx.set_alpn_protocols(["h2"])
    return ctx


class LogCertProvider:
    def __init__(self, certs: CertStore) -> None:
        self.certs = certs
        self._serving: dict[str, str] = {}  # domain -> event id of the certificate served
        self._contexts: dict[tuple[str, bool], ssl.SSLContext] = {}

    def update(self, state: CertState) -> list[str]:
        """Swap in the certificates that changed; returns the domains swapped."""
        changed = []
        for name, d in state.domains.items():
            if not d.active or d.cert is None:
                if name in self._serving:
                    del self._serving[name]
                    for h2 in (False, True):
                        self._contexts.pop((name, h2), None)
                    changed.append(name)
                continue
            if self._serving.get(name) == d.cert.event_id:
                continue
            try:
                pair = self.certs.get(name, state)
                assert pair is not None
                built = {h2: server_context(*pair, h2=h2) for h2 in (False, True)}
            except (SealError, ssl.SSLError, ValueError) as exc:
                _log.error("cannot serve certificate", domain=name, error=str(exc))
                continue  # keep serving the previous one, if any
            for h2, ctx in built.items():
                self._contexts[(name, h2)] = ctx
            self._serving[name] = d.cert.event_id
            changed.append(name)
        return changed

    def serving(self, base_domain: str) -> str | None:
        """The event id of the certificate served for ``base_domain``, if any."""
        return self._serving.get(base_domain)

    def server_context(self, base_domain: str, *, h2: bool) -> ssl.SSLContext | None:
        return self._contexts.get((base_domain.lower().rstrip("."), h2))
