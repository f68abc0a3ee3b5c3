"""Shared fixtures: a real nats-server with JetStream per test, on a free port, in a temp dir."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pydstack.adapters.nats import EventStore, NatsServer, NatsServerConfig, StreamSettings
from pydstack.core.events import Signer


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    async with NatsServer(NatsServerConfig(data_dir=tmp_path / "nats")) as server:
        yield server


@pytest.fixture
def signer() -> Signer:
    return Signer.from_private_bytes("test-writer", os.urandom(32))


@pytest.fixture
async def store(nats_server: NatsServer, signer: Signer) -> AsyncIterator[EventStore]:
    # Tampering tests delete messages, so this fixture's stream allows it.
    settings = StreamSettings(deny_delete=False)
    async with await EventStore.connect(nats_server.url, signer, settings=settings) as s:
        await s.ensure_stream()
        yield s


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: wireguard-go's UAPI sockets (up's gateway, the CVMs'
    tunnels) live under the data dir and must fit in sun_path (~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="pds-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
