"""ABI compatibility with dstack v0.5.11's contracts, the hand-kept ABIs, BootInfo encoding,
signing keys and outages, on anvil."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from eth_account import Account
from web3 import Web3
from web3.exceptions import ContractCustomError
from web3.logs import DISCARD
from web3.types import Wei

from pydstack.adapters.eth import (
    APP_ABI,
    KMS_ABI,
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

from .conftest import COMPOSE, GATEWAY_APP_ID, OS_IMAGE, Deployment

replace = msgspec.structs.replace


def _shape(entry: dict[str, object]) -> str:
    return json.dumps(
        {k: entry[k] for k in ("type", "name", "stateMutability", "inputs", "outputs")},
        sort_keys=True,
    )


def _functions(abi: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Functions by selector-defining signature, e.g. ``isAppAllowed((address,...))``."""

    def kind(p: dict[str, Any]) -> str:
        if p["type"].startswith("tuple"):
            inner = ",".join(kind(c) for c in p["components"])
            return f"({inner}){p['type'][5:]}"
        return str(p["type"])

    return {
        f"{e['name']}({','.join(kind(i) for i in e['inputs'])})": e
        for e in abi
        if e.get("type") == "function"
    }


def _outputs(entry: dict[str, Any]) -> list[str]:
    return [o["type"] for o in entry["outputs"]]


# dstack's functions ours leaves out on purpose: the UUPS proxy machinery (our apps are
# EIP-1167 clones whose code never changes; our DstackKms takes its owner in the constructor).
NOT_IN_OURS = {
    "DstackKms": {"initialize(address,address)", "proxiableUUID()", "UPGRADE_INTERFACE_VERSION()",
                  "upgradeToAndCall(address,bytes)"},
    "DstackApp": {"proxiableUUID()", "UPGRADE_INTERFACE_VERSION()",
                  "upgradeToAndCall(address,bytes)"},
}  # fmt: skip


@pytest.mark.parametrize("name", ["DstackKms", "DstackApp"])
def test_our_contracts_have_every_dstack_function_with_the_same_selector_and_outputs(
    name: str, artifacts: dict[str, Artifact], dstack_artifacts: dict[str, Artifact]
) -> None:
    ours = _functions(artifacts[name].abi)
    theirs = _functions(dstack_artifacts[name].abi)
    assert set(theirs) - set(ours) == NOT_IN_OURS[name]
    for signature in set(theirs) & set(ours):
        assert _outputs(ours[signature]) == _outputs(theirs[signature]), signature


def test_kept_abis_are_in_both_compiled_abis(
    artifacts: dict[str, Artifact], dstack_artifacts: dict[str, Artifact]
) -> None:
    """What the KMS and the CLI call exists, same selector and outputs, in ours and dstack's."""
    for name, kept in [("DstackKms", KMS_ABI), ("DstackApp", APP_ABI)]:
        for compiled in (artifacts[name].abi, dstack_artifacts[name].abi):
            functions = _functions(compiled)
            for signature, entry in _functions(kept).items():
                assert _outputs(entry) == _outputs(functions[signature]), (name, signature)
    views = _functions(dstack_artifacts["DstackKms"].abi)
    for signature, entry in _functions(KMS_AUTH_VIEW_ABI).items():
        assert entry["inputs"][:1] == [] or entry["inputs"][0]["components"] == [
            {k: c[k] for k in ("name", "type")} | {"internalType": c["type"]}
            for c in views[signature]["inputs"][0]["components"]
        ]


async def test_dstack_abi_drives_our_deployed_contracts(
    w3: Web3, _deployments: dict[str, Deployment], dstack_artifacts: dict[str, Artifact]
) -> None:
    """dstack's own ABI JSON (what its auth-eth server and scripts use) against ours."""
    ours = _deployments["ours"]
    kms = w3.eth.contract(address=ours.kms.address, abi=dstack_artifacts["DstackKms"].abi)
    app = w3.eth.contract(address=ours.app.address, abi=dstack_artifacts["DstackApp"].abi)
    info = app_boot_info(ours.boot)
    assert kms.functions.isAppAllowed(info).call() == [True, ""]
    assert kms.functions.gatewayAppId().call() == GATEWAY_APP_ID
    assert kms.functions.registeredApps(ours.app.address).call()
    assert app.functions.allowedComposeHashes(bytes.fromhex(COMPOSE[2:])).call()
    assert app.functions.supportsInterface(bytes.fromhex("1e079198")).call()
    assert app.functions.supportsInterface(bytes.fromhex("8fd37527")).call()
    assert app.functions.version().call() == 2
    owner = ours.kms.owner()
    app.functions.removeComposeHash(bytes.fromhex(COMPOSE[2:])).transact({"from": owner})
    assert kms.functions.isAppAllowed(info).call() == [False, "Compose hash not allowed"]
    created = kms.functions.deployAndRegisterApp(
        owner, False, True, b"\0" * 32, bytes.fromhex(COMPOSE[2:])
    ).transact({"from": owner})
    receipt = w3.eth.wait_for_transaction_receipt(created)
    (event,) = kms.events.AppDeployedViaFactory().process_receipt(receipt, errors=DISCARD)
    new_app = replace(ours.boot, app_id=event["args"]["appId"], device_id="ff" * 32)
    assert kms.functions.isAppAllowed(app_boot_info(new_app)).call() == [True, ""]


def test_app_implementation_cannot_be_initialized(
    w3: Web3, _deployments: dict[str, Deployment], artifacts: dict[str, Artifact], stranger: str
) -> None:
    """Only the factory's clones are initialized: nobody takes over the template."""
    implementation = _deployments["ours"].kms.call("appImplementation")
    app = w3.eth.contract(address=implementation, abi=artifacts["DstackApp"].abi)
    init = app.get_function_by_signature("initialize(address,bool,bool,bool,bytes32,bytes32)")
    with pytest.raises(ContractCustomError):
        init(stranger, False, False, True, b"\0" * 32, b"\1" * 32).call({"from": stranger})


def test_interfaces_are_not_deployable_artifacts(artifacts: dict[str, Artifact]) -> None:
    assert sorted(artifacts) == ["DstackApp", "DstackKms"]


def test_cached_output_is_reused(tmp_path: Path) -> None:
    # A compile fills its cache dir; an edited cached output proves the cache is what is read
    # (a cache of its own: the session's may hold compiles made by other solc commands).
    assert compile_contracts(cache_dir=tmp_path)["DstackApp"].bytecode != "00"
    [cached] = tmp_path.glob("*.json")
    output = json.loads(cached.read_text())
    assert sorted(output["contracts"]) == ["DstackApp.sol", "DstackKms.sol", "IAppAuth.sol"]
    output["contracts"]["DstackApp.sol"]["DstackApp"]["evm"]["bytecode"]["object"] = "00"
    cached.write_text(json.dumps(output))
    assert compile_contracts(cache_dir=tmp_path)["DstackApp"].bytecode == "00"


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
    with pytest.raises(TransactionReverted, match="OwnableUnauthorizedAccount"):
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
