"""The KMS with the eth backend on anvil: keys for an app whose DstackApp allows its compose
hash, a KeyDenied naming the contract's reason otherwise, and the measured-image check first.

Real KMS (TLS, NATS), real node (anvil); simulated TDX. The app id the CVM measures is its
DstackApp's address, as dstack's apps have. Runs against dstack's own contracts (behind their
proxy) and ours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from pydstack.actors.kms import KmsCallError, KmsService, KmsSettings, serve_kms
from pydstack.adapters.eth import EthAuthBackend
from pydstack.adapters.nats import EventStore
from pydstack.adapters.tdx.pki import DevPki
from pydstack.core.events import KeyDenied, KeyIssued, KeyRequested
from tests import images
from tests.kms import conftest as rig
from tests.kms.conftest import CLUSTER, COMPOSE, COMPOSE_HASH, Cvm, Kms, bound_identity

from .conftest import GATEWAY_APP_ID, Deployment

pki = rig.pki  # the KMS rig's dev PKI fixture, used by name


@pytest.fixture
def chain(deployed: Deployment) -> Deployment:
    """The deployment, allowing the test image and an app (its own DstackApp) for COMPOSE."""
    deployed.kms.add_os_image(images.OS_IMAGE)
    app = deployed.kms.deploy_app(
        deployed.kms.sender_address, compose_hash=COMPOSE_HASH, allow_any_device=True
    )
    return dataclasses.replace(deployed, app=app)


async def _kms(
    store: EventStore, pki: DevPki, tmp: Path, backend: EthAuthBackend
) -> AsyncIterator[Kms]:
    box = rig.CollateralBox(pki)
    agent, keyfile = rig.kms_guest(pki, tmp, "kms-eth")
    await images.register_test_image(store)
    svc = await KmsService.open(
        store, KmsSettings(cluster=CLUSTER, root_ca_der=pki.root_der, instance_id="kms-eth"),
        backend=backend, collateral=box, keyfile=keyfile, attester=agent,
    )  # fmt: skip
    async with svc, serve_kms(svc) as url:
        yield Kms(svc, url, store, box, svc.temp_ca())


@pytest.fixture
async def kms(
    store: EventStore, pki: DevPki, tmp_path: Path, chain: Deployment
) -> AsyncIterator[Kms]:
    async for k in _kms(store, pki, tmp_path, chain.backend):
        yield k


def app_cvm(pki: DevPki, chain: Deployment, **kw: object) -> Cvm:
    return rig.make_cvm(pki, compose=COMPOSE, app_id=bytes.fromhex(chain.app.address[2:]), **kw)  # type: ignore[arg-type]


async def get_app_key(kms: Kms, cvm: Cvm) -> dict[str, object]:
    async with kms.client(await bound_identity(cvm, kms.temp)) as c:
        out: dict[str, object] = await c.call("GetAppKey", {"vm_config": images.TEST_VM_CONFIG})
    return out


async def denied(kms: Kms, cvm: Cvm) -> str:
    """The 403's reason, which the log's last KeyDenied holds too."""
    with pytest.raises(KmsCallError) as err:
        await get_app_key(kms, cvm)
    assert err.value.status == 403
    last = (await kms.events())[-1]
    assert isinstance(last, KeyDenied) and last.reason in str(err.value)
    return last.reason


async def test_app_allowed_on_chain_gets_keys_until_its_compose_hash_is_removed(
    kms: Kms, chain: Deployment, pki: DevPki
) -> None:
    cvm = app_cvm(pki, chain)
    keys = await get_app_key(kms, cvm)
    assert keys["gateway_app_id"] == GATEWAY_APP_ID
    requested, issued = (await kms.events())[-2:]
    assert isinstance(requested, KeyRequested) and isinstance(issued, KeyIssued)
    assert requested.app_id == chain.app.address[2:].lower()  # the app id is its contract
    chain.app.remove_compose_hash(COMPOSE_HASH)
    reason = await denied(kms, cvm)
    app = chain.app.address.lower()
    assert reason == (
        f"backend eth denied: compose hash 0x{COMPOSE_HASH.hex()} not allowed for app {app}"
    ), reason


async def test_another_compose_of_the_app_is_refused_naming_it(
    kms: Kms, chain: Deployment, pki: DevPki
) -> None:
    other = '{"manifest_version":2,"name":"other","runner":"docker-compose"}'
    cvm = rig.make_cvm(pki, compose=other, app_id=bytes.fromhex(chain.app.address[2:]))
    reason = await denied(kms, cvm)
    assert f"compose hash 0x{hashlib.sha256(other.encode()).hexdigest()} not allowed" in reason


async def test_the_image_check_still_applies_before_the_contract(
    kms: Kms, chain: Deployment, pki: DevPki
) -> None:
    """The contract allows the image's hash, but the TD booted another kernel: refused by the
    KMS's measured-image check, naming the register."""
    evil = msgspec.structs.replace(
        images.TEST_PARTS, kernel=hashlib.sha384(b"attacker's kernel").hexdigest()
    )
    reason = await denied(kms, app_cvm(pki, chain, parts=evil))
    assert "RTMR1 is" in reason, reason


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("deployed", ["dstack"], indirect=True)
async def test_rpc_down_fails_closed_with_one_line(
    store: EventStore, pki: DevPki, tmp_path: Path, chain: Deployment
) -> None:
    backend = EthAuthBackend.connect(f"http://127.0.0.1:{_closed_port()}", chain.kms.address)
    async for kms in _kms(store, pki, tmp_path, backend):
        reason = await denied(kms, app_cvm(pki, chain))
        assert "backend eth unavailable: ChainError: eth: isAppAllowed on KMS" in reason
        assert "check the RPC endpoint" in reason and "\n" not in reason


@pytest.mark.parametrize("deployed", ["dstack"], indirect=True)
async def test_wrong_contract_address_fails_closed(
    store: EventStore, pki: DevPki, tmp_path: Path, chain: Deployment, stranger: str
) -> None:
    backend = EthAuthBackend(chain.kms.web3, stranger)  # an account: no contract there
    async for kms in _kms(store, pki, tmp_path, backend):
        reason = await denied(kms, app_cvm(pki, chain))
        want = f"isAppAllowed on KMS contract {stranger} failed: BadFunctionCallOutput"
        assert f"backend eth unavailable: ChainError: eth: {want}" in reason
