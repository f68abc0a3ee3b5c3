"""authorize_app against DstackKms + DstackApp on anvil (ours and dstack's): allow-lists, reasons,
policy changes."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from web3 import Web3
from web3.logs import DISCARD

from pydstack.adapters.eth import Artifact, EthAuthBackend, TransactionReverted, compile_contracts

from .conftest import COMPOSE, DEVICE, GATEWAY_APP_ID, HERE, OS_IMAGE, Deployment, deploy_raw

replace = msgspec.structs.replace


@pytest.fixture(scope="module")
def _reverting_artifact(solc_cache: Path) -> Artifact:
    return compile_contracts(HERE / "contracts_test", cache_dir=solc_cache)["RevertingApp"]


@pytest.fixture
def reverting_app(w3: Web3, _reverting_artifact: Artifact, owner: str) -> str:
    return deploy_raw(w3, _reverting_artifact, owner)


async def test_allowed_boot_is_allowed_with_gateway_app_id(deployed: Deployment) -> None:
    verdict = await deployed.backend.authorize_app(deployed.boot)
    assert verdict.is_allowed, verdict.reason
    assert verdict.reason == ""
    assert verdict.gateway_app_id == GATEWAY_APP_ID


async def test_unregistered_app_is_refused(deployed: Deployment) -> None:
    boot = replace(deployed.boot, app_id="99" * 20)
    verdict = await deployed.backend.authorize_app(boot)
    assert not verdict.is_allowed
    assert verdict.reason == f"app 0x{'99' * 20} not registered"


async def test_unknown_compose_hash_is_refused(deployed: Deployment) -> None:
    boot = replace(deployed.boot, compose_hash="ab" * 32)
    verdict = await deployed.backend.authorize_app(boot)
    assert not verdict.is_allowed
    app = deployed.app.address.lower()
    assert verdict.reason == f"compose hash 0x{'ab' * 32} not allowed for app {app}"


async def test_device_not_allowed_is_refused(deployed: Deployment) -> None:
    boot = replace(deployed.boot, device_id="ee" * 32)
    verdict = await deployed.backend.authorize_app(boot)
    assert not verdict.is_allowed
    assert (
        verdict.reason == f"device 0x{'ee' * 32} not allowed for app {deployed.app.address.lower()}"
    )


async def test_allow_any_device_admits_an_unlisted_device(deployed: Deployment) -> None:
    boot = replace(deployed.boot, device_id="ee" * 32)
    deployed.app.set_allow_any_device(True)
    assert (await deployed.backend.authorize_app(boot)).is_allowed
    deployed.app.set_allow_any_device(False)
    assert not (await deployed.backend.authorize_app(boot)).is_allowed


async def test_os_image_not_allowed_is_refused(deployed: Deployment) -> None:
    boot = replace(deployed.boot, os_image_hash="0b" * 32)
    verdict = await deployed.backend.authorize_app(boot)
    assert not verdict.is_allowed
    assert verdict.reason == f"os image 0x{'0b' * 32} not allowed"


async def test_os_image_is_checked_before_the_app_policy(deployed: Deployment) -> None:
    # Compose hash is also wrong, but the KMS-wide OS image check comes first.
    boot = replace(deployed.boot, os_image_hash="0b" * 32, compose_hash="ab" * 32)
    verdict = await deployed.backend.authorize_app(boot)
    assert verdict.reason.startswith("os image ")


async def test_removed_compose_hash_is_refused_on_the_next_call(deployed: Deployment) -> None:
    assert (await deployed.backend.authorize_app(deployed.boot)).is_allowed
    deployed.app.remove_compose_hash(COMPOSE)
    verdict = await deployed.backend.authorize_app(deployed.boot)
    assert not verdict.is_allowed
    assert verdict.reason.startswith(f"compose hash {COMPOSE} not allowed")
    deployed.app.add_compose_hash(COMPOSE)
    assert (await deployed.backend.authorize_app(deployed.boot)).is_allowed


async def test_removed_os_image_and_device_take_effect(deployed: Deployment) -> None:
    deployed.app.remove_device(DEVICE)
    assert (await deployed.backend.authorize_app(deployed.boot)).reason.startswith("device ")
    deployed.app.add_device(DEVICE)
    deployed.kms.remove_os_image(OS_IMAGE)
    assert (await deployed.backend.authorize_app(deployed.boot)).reason.startswith("os image ")


async def test_require_tcb_up_to_date_refuses_an_out_of_date_tcb(deployed: Deployment) -> None:
    boot = replace(deployed.boot, tcb_status="OutOfDate")
    assert (await deployed.backend.authorize_app(boot)).is_allowed
    deployed.app.set_require_tcb_up_to_date(True)
    verdict = await deployed.backend.authorize_app(boot)
    assert verdict.reason == "TCB status 'OutOfDate' is not up to date"


def test_stranger_cannot_change_the_app_allow_lists(deployed: Deployment, stranger: str) -> None:
    as_stranger = deployed.app.as_sender(stranger)
    with pytest.raises(
        TransactionReverted, match=rf"addComposeHash .* OwnableUnauthorizedAccount\({stranger}\)"
    ):
        as_stranger.add_compose_hash("ab" * 32)
    with pytest.raises(TransactionReverted, match="OwnableUnauthorizedAccount"):
        as_stranger.remove_compose_hash(COMPOSE)
    with pytest.raises(TransactionReverted, match="OwnableUnauthorizedAccount"):
        as_stranger.add_device("ee" * 32)
    with pytest.raises(TransactionReverted, match="OwnableUnauthorizedAccount"):
        as_stranger.set_allow_any_device(True)
    assert not deployed.app.is_compose_hash_allowed("ab" * 32)
    assert deployed.app.is_compose_hash_allowed(COMPOSE)


async def test_stranger_cannot_change_the_kms_policy(deployed: Deployment, stranger: str) -> None:
    as_stranger = deployed.kms.as_sender(stranger)
    with pytest.raises(TransactionReverted, match="OwnableUnauthorizedAccount"):
        as_stranger.remove_os_image(OS_IMAGE)
    with pytest.raises(TransactionReverted, match="OwnableUnauthorizedAccount"):
        as_stranger.set_gateway_app_id("evil")
    assert (await deployed.backend.authorize_app(deployed.boot)).is_allowed


async def test_transferred_ownership_moves_control(deployed: Deployment, stranger: str) -> None:
    deployed.app.transfer_ownership(stranger)
    assert deployed.app.owner() == stranger
    with pytest.raises(TransactionReverted, match="OwnableUnauthorizedAccount"):
        deployed.app.remove_compose_hash(COMPOSE)
    deployed.app.as_sender(stranger).remove_compose_hash(COMPOSE)
    assert not (await deployed.backend.authorize_app(deployed.boot)).is_allowed


def test_every_policy_change_emits_an_event(
    deployed: Deployment, artifacts: dict[str, Artifact]
) -> None:
    app_events = deployed.app.web3.eth.contract(abi=artifacts["DstackApp"].abi).events
    receipt = deployed.app.transact("removeComposeHash", bytes.fromhex(COMPOSE[2:]))
    (event,) = app_events.ComposeHashRemoved().process_receipt(receipt, errors=DISCARD)
    assert event["args"]["composeHash"].hex() == COMPOSE[2:]
    kms_events = deployed.kms.web3.eth.contract(abi=artifacts["DstackKms"].abi).events
    receipt = deployed.kms.transact("addOsImageHash", b"\x0b" * 32)
    (event,) = kms_events.OsImageHashAdded().process_receipt(receipt, errors=DISCARD)
    assert event["args"]["osImageHash"] == b"\x0b" * 32


async def test_registered_account_without_code_is_refused(
    deployed: Deployment, stranger: str
) -> None:
    deployed.kms.register_app(stranger)  # open, as dstack's: an account, not a contract
    verdict = await deployed.backend.authorize_app(replace(deployed.boot, app_id=stranger))
    assert verdict.reason == f"app {stranger.lower()} has no contract deployed"


async def test_reverting_app_contract_is_a_refusal_naming_it(
    deployed: Deployment, reverting_app: str
) -> None:
    """Ours catches the app's revert; dstack's view lets it through: both refuse, named."""
    deployed.kms.register_app(reverting_app)
    verdict = await deployed.backend.authorize_app(replace(deployed.boot, app_id=reverting_app))
    assert not verdict.is_allowed
    if deployed.flavour == "ours":
        assert verdict.reason == f"app {reverting_app.lower()}'s contract reverted"
    else:
        assert verdict.reason == (
            f"KMS contract {deployed.kms.address} reverted: "
            "execution reverted: app policy is broken"
        )


async def test_malformed_boot_info_is_refused_without_asking(deployed: Deployment) -> None:
    verdict = await deployed.backend.authorize_app(replace(deployed.boot, compose_hash="zz"))
    assert not verdict.is_allowed
    assert verdict.reason == "boot info compose_hash is not hex: 'zz'"
    verdict = await deployed.backend.authorize_app(replace(deployed.boot, app_id="01" * 21))
    assert verdict.reason.startswith("boot info app_id is 21 bytes, at most 20 fit")


async def test_backend_reads_the_same_contract_from_a_second_instance(
    w3: Web3, deployed: Deployment
) -> None:
    other = EthAuthBackend(w3, deployed.kms.address.lower(), name="eth-2")
    assert other.name == "eth-2"
    assert (await other.authorize_app(deployed.boot)).is_allowed
