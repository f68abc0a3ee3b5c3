"""HAProxy (driven through its runtime API) against the data-plane contract."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from pydstack.adapters.haproxy import HaproxyConfig, HaproxyPlane
from pydstack.core.gateway import RoutingTable

from ..proxy.contract import Plane, PlaneSettings, ProxyContract

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs Debian's haproxy")


class HaproxyHandle(Plane):
    def __init__(self, plane: HaproxyPlane) -> None:
        self.plane = plane
        self.port = plane.port

    @property  # type: ignore[override]  # the contract reads it; the plane owns it
    def table(self) -> RoutingTable:
        return self.plane.table

    async def set_table(self, table: RoutingTable) -> None:
        await self.plane.set_table(table)

    async def set_app_limit(self, limit: int) -> None:
        await self.plane.set_app_limit(limit)

    async def refused(self, reason: str) -> int | None:
        if reason == "timeout":
            return None  # HAProxy ends idle relays silently; no counter tells timeouts apart
        return (await self.plane.stats()).refused[reason]

    async def routed(self, mode: str) -> int:
        return (await self.plane.stats()).routed[mode]

    async def active(self, app: str) -> int:
        return (await self.plane.active_by_app()).get(app, 0)


class TestHaproxyPlane(ProxyContract):
    differs_by_design = {
        "test_first_connect_wins_over_closed_ports": (
            "HAProxy sends an app to the one freshest instance named in apps.map (recomputed"
            " on every table and refresh); it does not dial the top few concurrently"
        ),
    }

    @asynccontextmanager
    async def start_plane(
        self, certs: dict[str, tuple[bytes, bytes]], table: RoutingTable, settings: PlaneSettings
    ) -> AsyncIterator[Plane]:
        config = HaproxyConfig(
            port=0,
            connect_timeout=settings.connect_timeout,
            handshake_timeout=settings.handshake_timeout,
            idle_timeout=settings.idle_timeout,
            pp_slots=4,
        )
        plane = await HaproxyPlane.create(
            config, certs, table, custom_domains=settings.custom_domains
        )
        async with plane:
            yield HaproxyHandle(plane)
