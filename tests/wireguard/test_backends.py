"""The WireGuard contract, once per backend; a backend this host cannot run is skipped
with the reason the backend detects at runtime (e.g. no kernel module)."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pydstack.adapters.wireguard import KernelBackend, UserspaceBackend, WireGuardBackend

from .contract import WireGuardContract

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, TUN)")


async def _available(backend: WireGuardBackend) -> WireGuardBackend:
    reason = await backend.unavailable_reason()
    if reason is not None:
        pytest.skip(f"{backend.name} backend unavailable: {reason}")
    return backend


class TestUserspaceBackend(WireGuardContract):
    @pytest.fixture
    async def backend(self) -> AsyncIterator[WireGuardBackend]:
        run_dir = Path(f"/run/pdwg-{secrets.token_hex(4)}")  # short: unix socket path limit
        yield await _available(UserspaceBackend(run_dir))
        shutil.rmtree(run_dir, ignore_errors=True)


class TestKernelBackend(WireGuardContract):
    @pytest.fixture
    async def backend(self) -> WireGuardBackend:
        return await _available(KernelBackend())
