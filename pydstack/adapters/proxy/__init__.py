"""The built-in gateway data plane: asyncio SNI proxy (TLS passthrough and termination).

Usage::

    from pydstack.adapters.proxy import ProxyConfig, ProxyServer, StaticCertProvider
    certs = StaticCertProvider({"app.example.com": (chain_pem, key_pem)})
    async with await ProxyServer.create(ProxyConfig(port=8443), certs, table) as proxy:
        proxy.set_table(next_table)
"""

from .certs import CertProvider, StaticCertProvider, server_context_from_pem
from .relay import Link
from .server import AppAddressResolver, ProxyConfig, ProxyServer, ProxyStats

__all__ = [
    "AppAddressResolver",
    "CertProvider",
    "Link",
    "ProxyConfig",
    "ProxyServer",
    "ProxyStats",
    "StaticCertProvider",
    "server_context_from_pem",
]
