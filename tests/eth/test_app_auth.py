"""authorize_app against KmsAuth + AppAuth on py-evm: allow-lists, reasons, policy changes."""

from __future__ import annotations

import msgspec
import pytest
from web3 import Web3
from web3.logs import DISCARD

from pydstack.adapters.eth import AppAdmin, Artifact, EthAuthBackend, TransactionReverted

from .conftest import COMPOSE, DEVICE, GATEWAY_APP_ID, OS_IMAGE, Deployment

replace = msgspec.structs.replace


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


async def test_deregistered_app_is_refused(deployed: Deployment) -> None:
    deployed.kms.deregister_app(deployed.app.address)
    verdict = await deployed.backend.authorize_app(deployed.boot)
    assert verdict.reason == f"app {deployed.app.address.lower()} not registered"


async def test_require_tcb_up_to_date_refuses_an_out_of_date_tcb(deployed: Deployment) -> None:
    boot = replace(deployed.boot, tcb_status="OutOfDate")
    assert (await deployed.backend.authorize_app(boot)).is_allowed
    deployed.app.set_require_tcb_up_to_date(True)
    verdict = await deployed.backend.authorize_app(boot)
    assert verdict.reason == "TCB status 'OutOfDate' is not up to date"


def test_stranger_cannot_change_the_app_allow_lists(deployed: Deployment, stranger: str) -> None:
    as_stranger = deployed.app.as_sender(stranger)
    with pytest.raises(TransactionReverted, match=rf"addComposeHash .* NotOwner\({stranger}\)"):
        as_stranger.add_compose_hash("ab" * 32)
    with pytest.raises(TransactionReverted, match="NotOwner"):
        as_stranger.remove_compose_hash(COMPOSE)
    with pytest.raises(TransactionReverted, match="NotOwner"):
        as_stranger.add_device("ee" * 32)
    with pytest.raises(TransactionReverted, match="NotOwner"):
        as_stranger.set_allow_any_device(True)
    assert not deployed.app.is_compose_hash_allowed("ab" * 32)
    assert deployed.app.is_compose_hash_allowed(COMPOSE)


async def test_stranger_cannot_change_the_kms_policy(deployed: Deployment, stranger: str) -> None:
    as_stranger = deployed.kms.as_sender(stranger)
    with pytest.raises(TransactionReverted, match="NotOwner"):
        as_stranger.remove_os_image(OS_IMAGE)
    with pytest.raises(TransactionReverted, match="NotOwner"):
        as_stranger.deregister_app(deployed.app.address)
    with pytest.raises(TransactionReverted, match="NotOwner"):
        as_stranger.set_gateway_app_id("evil")
    assert (await deployed.backend.authorize_app(deployed.boot)).is_allowed


async def test_transferred_ownership_moves_control(deployed: Deployment, stranger: str) -> None:
    deployed.app.transfer_ownership(stranger)
    assert deployed.app.owner() == stranger
    with pytest.raises(TransactionReverted, match="NotOwner"):
        deployed.app.remove_compose_hash(COMPOSE)
    deployed.app.as_sender(stranger).remove_compose_hash(COMPOSE)
    assert not (await deployed.backend.authorize_app(deployed.boot)).is_allowed


def test_every_policy_change_emits_an_event(deployed: Deployment) -> None:
    receipt = deployed.app.transact("removeComposeHash", bytes.fromhex(COMPOSE[2:]))
    (event,) = deployed.app.contract.events.ComposeHashRemoved().process_receipt(
        receipt, errors=DISCARD
    )
    assert event["args"]["composeHash"].hex() == COMPOSE[2:]
    receipt = deployed.kms.transact("addOsImageHash", b"\x0b" * 32)
    (event,) = deployed.kms.contract.events.OsImageHashAdded().process_receipt(
        receipt, errors=DISCARD
    )
    assert event["args"]["osImageHash"] == b"\x0b" * 32


async def test_app_registered_under_its_own_id_uses_a_standalone_contract(
    w3: Web3, artifacts: dict[str, Artifact], deployed: Deployment, owner: str
) -> None:
    standalone = AppAdmin.deploy(
        w3, artifacts, sender=owner, compose_hash="cd" * 32, allow_any_device=True
    )
    app_id = "77" * 20
    deployed.kms.register_app(app_id, standalone.address)
    assert deployed.kms.app(app_id).address == standalone.address
    boot = replace(deployed.boot, app_id=app_id, compose_hash="cd" * 32, device_id="")
    assert (await deployed.backend.authorize_app(boot)).is_allowed
    with pytest.raises(TransactionReverted, match="AlreadyRegistered"):
        deployed.kms.register_app(app_id, standalone.address)


async def test_app_whose_contract_has_no_code_is_refused(
    deployed: Deployment, stranger: str
) -> None:
    app_id = "55" * 20
    deployed.kms.register_app(app_id, stranger)  # an account, not a contract
    verdict = await deployed.backend.authorize_app(replace(deployed.boot, app_id=app_id))
    assert verdict.reason == f"app 0x{app_id} has no contract deployed"


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
