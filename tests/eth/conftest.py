"""Fixtures: anvil (Foundry's node, from npm) as a process on a free port for the session; our
contracts and dstack v0.5.11's own, each deployed once; every test rolled back after.

`deployed` is parametrized over both deployments, so each backend and admin test proves the
same behaviour against dstack's contracts (behind their ERC1967 proxy) and ours.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from eth_typing import ABI
from hexbytes import HexBytes
from web3 import Web3

from pydstack.adapters.eth import (
    Anvil,
    AppAdmin,
    Artifact,
    EthAuthBackend,
    KmsAdmin,
    compile_contracts,
)
from pydstack.core.kms.auth import BootInfo

OS_IMAGE = "0x" + "0a" * 32
COMPOSE = "0x" + "c0" * 32
DEVICE = "0x" + "de" * 32
KMS_MR = "0x" + "33" * 32
GATEWAY_APP_ID = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
HERE = Path(__file__).parent
DSTACK_SOURCES = HERE / "dstack_v0_5_11"
OPENZEPPELIN = Path(sys.prefix) / "openzeppelin" / "node_modules"  # make deps installs it


@pytest.fixture(scope="session")
def solc_cache() -> Path:
    """Kept across runs (solcjs takes seconds a compile); keyed by sources and compiler."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pydstack" / "solc"


@pytest.fixture(scope="session")
def artifacts(solc_cache: Path) -> dict[str, Artifact]:
    return compile_contracts(cache_dir=solc_cache)


@pytest.fixture(scope="session")
def dstack_artifacts(solc_cache: Path) -> dict[str, Artifact]:
    """dstack's contracts as its repository has them, with the OpenZeppelin it pins."""
    return compile_contracts(DSTACK_SOURCES, cache_dir=solc_cache, import_roots=(OPENZEPPELIN,))


@pytest.fixture(scope="session")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Anvil]:
    with Anvil.start(tmp_path_factory.mktemp("anvil")) as node:
        yield node


@pytest.fixture(scope="session")
def _chain(anvil: Anvil) -> Web3:
    return Web3(Web3.HTTPProvider(anvil.url, request_kwargs={"timeout": 10}))


@pytest.fixture
def w3(_chain: Web3, _deployments: dict[str, Deployment]) -> Iterator[Web3]:
    """The session's chain (contracts deployed), rolled back to that state after each test."""
    snapshot = _chain.provider.make_request(cast(Any, "evm_snapshot"), [])["result"]
    yield _chain
    assert _chain.provider.make_request(cast(Any, "evm_revert"), [snapshot])["result"]


@pytest.fixture(scope="session")
def owner(_chain: Web3) -> str:
    return str(_chain.eth.accounts[0])


@pytest.fixture(scope="session")
def stranger(_chain: Web3) -> str:
    return str(list(_chain.eth.accounts)[1])


@dataclass(frozen=True)
class Deployment:
    flavour: str  # "ours" (contracts/) or "dstack" (dstack v0.5.11's sources, proxied)
    kms: KmsAdmin
    app: AppAdmin
    backend: EthAuthBackend
    boot: BootInfo  # a boot the policy allows


def deploy_raw(w3: Web3, artifact: Artifact, sender: str, *args: Any) -> str:
    factory = w3.eth.contract(abi=cast(ABI, artifact.abi), bytecode=HexBytes(artifact.bytecode))
    receipt = w3.eth.wait_for_transaction_receipt(
        factory.constructor(*args).transact({"from": sender})
    )
    assert receipt["status"] == 1
    return str(receipt["contractAddress"])


def deploy_dstack_kms(w3: Web3, artifacts: dict[str, Artifact], owner: str) -> KmsAdmin:
    """As dstack's scripts/deploy.ts does: a DstackApp implementation, and a DstackKms
    implementation behind an ERC1967 proxy initialized with (owner, app implementation)."""
    app_impl = deploy_raw(w3, artifacts["DstackApp"], owner)
    kms_impl = deploy_raw(w3, artifacts["DstackKms"], owner)
    kms_abi = w3.eth.contract(abi=cast(ABI, artifacts["DstackKms"].abi))
    init = kms_abi.encode_abi("initialize", [owner, app_impl])
    proxy = deploy_raw(w3, artifacts["ERC1967Proxy"], owner, kms_impl, HexBytes(init))
    return KmsAdmin(w3, proxy, owner)


def _deploy(flavour: str, kms: KmsAdmin, owner: str) -> Deployment:
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
    return Deployment(flavour, kms, app, EthAuthBackend(kms.web3, kms.address), boot)


@pytest.fixture(scope="session")
def _deployments(
    _chain: Web3,
    artifacts: dict[str, Artifact],
    dstack_artifacts: dict[str, Artifact],
    owner: str,
) -> dict[str, Deployment]:
    return {
        "ours": _deploy("ours", KmsAdmin.deploy(_chain, artifacts, sender=owner), owner),
        "dstack": _deploy("dstack", deploy_dstack_kms(_chain, dstack_artifacts, owner), owner),
    }


@pytest.fixture(params=["ours", "dstack"])
def deployed(
    request: pytest.FixtureRequest, w3: Web3, _deployments: dict[str, Deployment]
) -> Deployment:
    """A DstackKms allowing OS_IMAGE, with one app allowing COMPOSE on DEVICE; rolled back."""
    return _deployments[request.param]
