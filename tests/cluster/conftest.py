"""A 3-node JetStream cluster (child processes, fixed ports, own data dirs) per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pydstack.adapters.nats import NatsCluster


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    async with NatsCluster.create(tmp_path / "cluster", size=3) as cluster:
        yield cluster
