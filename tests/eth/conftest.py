"""Fixtures: contracts compiled once per session, a fresh in-process py-evm chain per test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from web3 import EthereumTesterProvider, Web3

from pydstack.adapters.eth import AppAdmin, Artifact, EthAuthBackend, KmsAdmin, compile_contracts
from pydstack.core.kms.auth import BootInfo

OS_IMAGE = "0x" + "0a" * 32
COMPOSE = "0x" + "c0" * 32
DEVICE = "0x" + "de" * 32
KMS_MR = "0x" + "33" * 32
GATEWAY_APP_ID = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"


@pytest.fixture(scope="session")
def solc_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("solc-cache")


@pytest.fixture(scope="session")
def artifacts(solc_cache: Path) -> dict[str, Artifact]:
    return compile_contracts(cache_dir=solc_cache)


@pytest.fixture(scope="session")
def _chain() -> Web3:
    return Web3(EthereumTesterProvider())


@pytest.fixture
def w3(_chain: Web3) -> Iterator[Web3]:
    """The session's chain, rolled back after each test (a fresh chain + deployment costs more)."""
    tester = cast(EthereumTesterProvider, _chain.provider).ethereum_tester
    assert tester is not None
    snapshot = tester.take_snapshot()
    yield _chain
    tester.revert_to_snapshot(snapshot)


@pytest.fixture(scope="session")
def owner(_chain: Web3) -> str:
    return str(next(iter(_chain.eth.accounts)))


@pytest.fixture(scope="session")
def stranger(_chain: Web3) -> str:
    return str(list(_chain.eth.accounts)[1])


@dataclass(frozen=True)
class Deployment:
    kms: KmsAdmin
    app: AppAdmin
    backend: EthAuthBackend
    boot: BootInfo  # a boot the policy allows


@pytest.fixture(scope="session")
def _deployment(_chain: Web3, artifacts: dict[str, Artifact], owner: str) -> Deployment:
    w3 = _chain
    kms = KmsAdmin.deploy(w3, artifacts, sender=owner)
    kms.add_os_image(OS_IMAGE)
    kms.set_gateway_app_id(GATEWAY_APP_ID)
    app = kms.deploy_app(owner, compose_hash=COMPOSE, device_id=DEVICE)
    boot = BootInfo(
        tcb_status="UpToDate",
        advisory_ids=("INTEL-SA-00001",),
        mr_aggregated=KMS_MR[2:],
        os_image_hash=OS_IMAGE[2:],
        mr_system="11" * 32,
        app_id=app.address[2:].lower(),
        compose_hash=COMPOSE[2:],
        instance_id="22" * 20,
        device_id=DEVICE[2:],
    )
    return Deployment(kms, app, EthAuthBackend(w3, kms.address), boot)


@pytest.fixture
def deployed(w3: Web3, _deployment: Deployment) -> Deployment:
    """KmsAuth allowing OS_IMAGE, with one app allowing COMPOSE on DEVICE; rolled back after."""
    return _deployment
