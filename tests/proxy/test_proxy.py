"""The built-in asyncio proxy against the data-plane contract (tests/proxy/contract.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

from pydstack.adapters.proxy import ProxyConfig, ProxyServer, StaticCertProvider
from pydstack.core.gateway import RoutingTable

from .contract import Plane, PlaneSettings, ProxyContract


class BuiltinPlane(Plane):
    def __init__(self, proxy: ProxyServer) -> None:
        self.proxy = proxy
        self.port = proxy.port

    @property  # type: ignore[override]  # the contract reads it; the proxy owns it
    def table(self) -> RoutingTable:
        return self.proxy.table

    async def set_table(self, table: RoutingTable) -> None:
        self.proxy.set_table(table)

    async def set_app_limit(self, limit: int) -> None:
        self.proxy.config = replace(self.proxy.config, max_connections_per_app=limit)

    async def refused(self, reason: str) -> int | None:
        return self.proxy.stats.refused[reason]

    async def routed(self, mode: str) -> int:
        return self.proxy.stats.routed[mode]

    async def active(self, app: str) -> int:
        return self.proxy.stats.active_by_app[app]


class TestBuiltinProxy(ProxyContract):
    @asynccontextmanager
    async def start_plane(
        self, certs: dict[str, tuple[bytes, bytes]], table: RoutingTable, settings: PlaneSettings
    ) -> AsyncIterator[Plane]:
        domains = dict(settings.custom_domains)

        async def resolve(name: str) -> tuple[str, int] | None:
            return domains.get(name)

        config = ProxyConfig(
            port=0,
            connect_timeout=settings.connect_timeout,
            handshake_timeout=settings.handshake_timeout,
            idle_timeout=settings.idle_timeout,
        )
        proxy = await ProxyServer.create(
            config,
            StaticCertProvider(certs),
            table,
            resolve_app_address=resolve if domains else None,
        )
        async with proxy:
            yield BuiltinPlane(proxy)
