"""A real guest agent on real unix sockets, backed by the TDX simulator and a dev PKI."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pydstack.adapters.tdx.backend import SimulatorBackend
from pydstack.adapters.tdx.collateral import Collateral, collateral_from_json
from pydstack.adapters.tdx.identity import mr_config_id_v1
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.simulator import QuoteSimulator, TdMeasurements
from pydstack_guest import (
    AppKeys,
    GuestAgent,
    GuestConfig,
    boot_runtime_events,
    create_dev_app_keys,
    serve_agent,
)

APP_ID = bytes.fromhex("5bb4ff9a3837357f19dc176407a5709c62eb6c56")
INSTANCE_ID = bytes.fromhex("1691ed1b47506cad7d08834668691d88246f5b1f")
OS_IMAGE_HASH = hashlib.sha256(b"pydstack test image").digest()
APP_COMPOSE = '{"manifest_version":2,"name":"web","runner":"docker-compose"}'
VM_CONFIG = json.dumps({"os_image_hash": OS_IMAGE_HASH.hex(), "cpu_count": 2})


@dataclass
class Guest:
    agent: GuestAgent
    backend: SimulatorBackend
    keys: AppKeys
    pki: DevPki
    collateral: Collateral
    now: int
    dstack_sock: str
    tappd_sock: str


@pytest.fixture(scope="session")
def dev_pki() -> DevPki:
    return DevPki.generate()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="pyds-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def guest(dev_pki: DevPki, sock_dir: Path) -> AsyncIterator[Guest]:
    now = int(time.time())
    keys, _ = create_dev_app_keys(APP_ID, now=now)
    compose_hash = hashlib.sha256(APP_COMPOSE.encode()).digest()
    backend = SimulatorBackend(
        QuoteSimulator(dev_pki),
        TdMeasurements(
            mr_td=hashlib.sha384(b"test TD").digest(), mr_config_id=mr_config_id_v1(compose_hash)
        ),
    )
    await boot_runtime_events(
        backend,
        keys,
        app_id=APP_ID,
        app_compose=APP_COMPOSE,
        instance_id=INSTANCE_ID,
        os_image_hash=OS_IMAGE_HASH,
    )
    agent = GuestAgent(
        backend, keys, GuestConfig(app_name="web", app_compose=APP_COMPOSE, vm_config=VM_CONFIG)
    )
    dstack_sock, tappd_sock = str(sock_dir / "dstack.sock"), str(sock_dir / "tappd.sock")
    async with serve_agent(agent, dstack_sock=dstack_sock, tappd_sock=tappd_sock):
        yield Guest(
            agent,
            backend,
            keys,
            dev_pki,
            collateral_from_json(dev_pki.collateral_json(now)),
            now,
            dstack_sock,
            tappd_sock,
        )
