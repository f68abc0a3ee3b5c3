"""The compiled contracts, the hand-kept ABI, BootInfo encoding, signing keys and outages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from eth_account import Account
from web3 import Web3
from web3.types import Wei

from pydstack.adapters.eth import (
    KMS_AUTH_VIEW_ABI,
    Artifact,
    BootInfoError,
    ChainError,
    EthAuthBackend,
    KmsAdmin,
    TransactionReverted,
    app_boot_info,
    compile_contracts,
)
from pydstack.core.kms.auth import BootInfo

from .conftest import COMPOSE, OS_IMAGE, Deployment


def _shape(entry: dict[str, object]) -> str:
    return json.dumps(
        {k: entry[k] for k in ("type", "name", "stateMutability", "inputs", "outputs")},
        sort_keys=True,
    )


def test_kept_abi_matches_the_compiled_kms_auth(artifacts: dict[str, Artifact]) -> None:
    compiled = {e.get("name"): e for e in artifacts["KmsAuth"].abi}
    for entry in KMS_AUTH_VIEW_ABI:
        assert _shape(entry) == _shape(compiled[entry["name"]]), entry["name"]


def test_app_auth_exposes_the_same_is_app_allowed(artifacts: dict[str, Artifact]) -> None:
    compiled = {e.get("name"): e for e in artifacts["AppAuth"].abi}
    assert _shape(compiled["isAppAllowed"]) == _shape(KMS_AUTH_VIEW_ABI[0])


def test_interfaces_are_not_deployable_artifacts(artifacts: dict[str, Artifact]) -> None:
    assert sorted(artifacts) == ["AppAuth", "KmsAuth"]


def test_cached_output_is_reused(solc_cache: Path, tmp_path: Path) -> None:
    # The session compile filled the cache; an edited copy proves the cache is what is read.
    (cached,) = solc_cache.glob("*.json")
    output = json.loads(cached.read_text())
    output["contracts"]["AppAuth.sol"]["AppAuth"]["evm"]["bytecode"]["object"] = "00"
    shutil.copy(cached, tmp_path / cached.name)
    (tmp_path / cached.name).write_text(json.dumps(output))
    assert compile_contracts(cache_dir=tmp_path)["AppAuth"].bytecode == "00"


def test_boot_info_fields_are_left_padded_like_dstack() -> None:
    boot = BootInfo(tcb_status="UpToDate", app_id="0xAB", compose_hash="1", advisory_ids=("a",))
    info = app_boot_info(boot)
    assert info[0] == Web3.to_checksum_address("0x" + "00" * 19 + "ab")
    assert info[1] == b"\0" * 31 + b"\x01"
    assert info[2] == "0x" + "00" * 20  # empty instance id: zero address
    assert info[7:] == ("UpToDate", ["a"])


def test_boot_info_rejects_bad_hex_and_oversized_fields() -> None:
    with pytest.raises(BootInfoError, match="device_id is not hex"):
        app_boot_info(BootInfo(tcb_status="", device_id="0xgg"))
    with pytest.raises(BootInfoError, match="os_image_hash is 33 bytes"):
        app_boot_info(BootInfo(tcb_status="", os_image_hash="01" * 33))


async def test_local_account_signs_its_own_transactions(
    w3: Web3, artifacts: dict[str, Artifact], owner: str
) -> None:
    key = Account.create()
    w3.eth.send_transaction({"from": owner, "to": key.address, "value": Wei(10**18)})
    kms = KmsAdmin.deploy(w3, artifacts, sender=key)
    assert kms.owner() == key.address
    kms.add_os_image(OS_IMAGE)
    app = kms.deploy_app(key.address, compose_hash=COMPOSE, allow_any_device=True)
    boot = BootInfo(
        tcb_status="UpToDate", app_id=app.address, compose_hash=COMPOSE, os_image_hash=OS_IMAGE
    )
    backend = EthAuthBackend(w3, kms.address)
    assert (await backend.authorize_app(boot)).is_allowed
    with pytest.raises(TransactionReverted, match="NotOwner"):
        kms.as_sender(owner).remove_os_image(OS_IMAGE)
    app.remove_compose_hash(COMPOSE)
    assert not (await backend.authorize_app(boot)).is_allowed


async def test_address_without_a_contract_is_an_outage_not_a_refusal(
    w3: Web3, deployed: Deployment, stranger: str
) -> None:
    backend = EthAuthBackend(w3, stranger)
    with pytest.raises(ChainError, match=f"isAppAllowed on KMS contract {stranger}"):
        await backend.authorize_app(deployed.boot)


async def test_unreachable_rpc_is_an_outage(deployed: Deployment) -> None:
    backend = EthAuthBackend.connect("http://127.0.0.1:9", deployed.kms.address, timeout=2.0)
    with pytest.raises(ChainError, match="check the RPC endpoint"):
        await backend.authorize_kms(deployed.boot)
