"""`pydstack kms contract …` / `pydstack app contract …` on anvil: deploy, allow-list, and the
KMS backend's verdict following each change; dstack's own deployment administered the same way;
bad input is one line and exit 1 (or a usage error, exit 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from eth_account import Account
from web3 import Web3
from web3.types import Wei

from pydstack.adapters.eth import EthAuthBackend
from pydstack.cli.main import main
from pydstack.core.kms.auth import BootInfo

from .conftest import Anvil, Deployment

OS_IMAGE = "ab" * 32


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def ok(*args: str) -> dict[str, object]:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    out: dict[str, object] = json.loads(result.output)
    return out


def one_line_error(result: Result, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 or exit_code == 2, result.output
    return lines[-1]


async def test_operator_flow_from_deploy_to_a_refused_compose(
    w3: Web3, anvil: Anvil, owner: str, tmp_path: Path
) -> None:
    chain = ("--eth-rpc-url", anvil.url, "--from", owner)
    kms = ok("kms", "contract", "deploy", *chain, "--gateway-app-id", "gw")["kms_contract"]
    assert isinstance(kms, str)
    ok("kms", "contract", "add-os-image", *chain, "--kms-contract", kms, OS_IMAGE)
    compose = tmp_path / "app-compose.json"
    compose.write_bytes(b'{"manifest_version":2,"name":"a","runner":"docker-compose"}')
    app = ok("app", "contract", "deploy", *chain, "--kms-contract", kms, "--compose", str(compose),
             "--allow-any-device")  # fmt: skip
    app_id, compose_hash = str(app["app_id"]), str(app["compose_hash"])
    backend = EthAuthBackend(w3, kms)
    boot = BootInfo(tcb_status="UpToDate", app_id=app_id, compose_hash=compose_hash,
                    os_image_hash=OS_IMAGE, device_id="01" * 32)  # fmt: skip
    verdict = await backend.authorize_app(boot)
    assert verdict.is_allowed and verdict.gateway_app_id == "gw"
    shown = ok("app", "contract", "show", "--eth-rpc-url", anvil.url, app_id, "--compose",
               str(compose), "--device-id", "01" * 32)  # fmt: skip
    assert shown["compose_hash"] == {compose_hash: True} and shown["allow_any_device"] is True
    assert shown["device_id"] == {"0x" + "01" * 32: False} and shown["owner"] == owner
    ok("app", "contract", "remove-compose-hash", *chain, app_id, "--compose", str(compose))
    assert not (await backend.authorize_app(boot)).is_allowed
    shown = ok("app", "contract", "show", "--eth-rpc-url", anvil.url, app_id, "--compose-hash",
               compose_hash)  # fmt: skip
    assert shown["compose_hash"] == {compose_hash: False}
    ok("app", "contract", "add-compose-hash", *chain, app_id, compose_hash)
    assert (await backend.authorize_app(boot)).is_allowed
    out = ok("app", "contract", "add-device", *chain, app_id, "0x" + "01" * 32)
    assert out["device_id"] == "0x" + "01" * 32
    out = ok("kms", "contract", "add-kms-measurement", *chain, "--kms-contract", kms,
             "--mr-aggregated", "33" * 32, "--device-id", "44" * 32)  # fmt: skip
    assert out["mr_aggregated"] == ["0x" + "33" * 32]
    kms_boot = BootInfo(tcb_status="UpToDate", os_image_hash=OS_IMAGE, mr_aggregated="33" * 32,
                        device_id="44" * 32)  # fmt: skip
    assert (await backend.authorize_kms(kms_boot)).is_allowed
    shown = ok("kms", "contract", "show", "--eth-rpc-url", anvil.url, "--kms-contract", kms,
               "--os-image", OS_IMAGE, "--mr-aggregated", "34" * 32, "--app", app_id)  # fmt: skip
    assert shown["owner"] == owner and shown["gateway_app_id"] == "gw"
    assert shown["os_image"] == {"0x" + OS_IMAGE: True}
    assert shown["mr_aggregated"] == {"0x" + "34" * 32: False}
    assert shown["app"] == {Web3.to_checksum_address(app_id): True}
    text = cli("kms", "contract", "show", "--eth-rpc-url", anvil.url, "--kms-contract", kms,
               "--os-image", OS_IMAGE).output  # fmt: skip
    assert f"os_image           0x{OS_IMAGE} allowed" in text


@pytest.mark.parametrize("deployed", ["dstack"], indirect=True)
async def test_dstack_deployed_contracts_are_administered_alike(
    deployed: Deployment, anvil: Anvil, owner: str
) -> None:
    chain = ("--eth-rpc-url", anvil.url, "--from", owner)
    kms = deployed.kms.address
    app = ok("app", "contract", "deploy", *chain, "--kms-contract", kms, "--compose-hash",
             "cd" * 32, "--device-id", "ef" * 32)  # fmt: skip
    boot = BootInfo(tcb_status="UpToDate", app_id=str(app["app_id"]), compose_hash="cd" * 32,
                    os_image_hash=OS_IMAGE, device_id="ef" * 32)  # fmt: skip
    assert (await deployed.backend.authorize_app(boot)).reason.startswith("os image")
    ok("kms", "contract", "add-os-image", *chain, "--kms-contract", kms, OS_IMAGE)
    assert (await deployed.backend.authorize_app(boot)).is_allowed


def test_private_key_file_signs_and_must_be_private(
    w3: Web3, anvil: Anvil, owner: str, tmp_path: Path
) -> None:
    account = Account.create()
    w3.eth.send_transaction({"from": owner, "to": account.address, "value": Wei(10**18)})
    key = tmp_path / "owner.key"
    key.write_text(account.key.hex() + "\n")
    os.chmod(key, 0o644)
    args = ("kms", "contract", "deploy", "--eth-rpc-url", anvil.url)
    line = one_line_error(cli(*args, "--private-key-file", str(key)))
    assert line == f"Error: {key} is readable by others: chmod 600 it"
    os.chmod(key, 0o600)
    assert ok(*args, "--private-key-file", str(key))["owner"] == account.address


def test_non_owner_is_refused_naming_the_contract_error(
    _deployments: dict[str, Deployment], w3: Web3, anvil: Anvil, stranger: str
) -> None:
    kms = _deployments["ours"].kms.address
    result = cli("kms", "contract", "add-os-image", "--eth-rpc-url", anvil.url, "--from",
                 stranger, "--kms-contract", kms, OS_IMAGE)  # fmt: skip
    line = one_line_error(result)
    assert line == (f"Error: eth: addOsImageHash on {kms} reverted: "
                    f"OwnableUnauthorizedAccount({stranger})")  # fmt: skip


def test_bad_input_is_one_line(anvil: Anvil, owner: str, stranger: str) -> None:
    chain = ("--eth-rpc-url", anvil.url, "--from", owner)
    line = one_line_error(
        cli("kms", "contract", "add-os-image", *chain, "--kms-contract", "0x12", OS_IMAGE), 2
    )
    assert "'0x12' is not an address" in line
    line = one_line_error(
        cli("kms", "contract", "add-os-image", *chain, "--kms-contract", stranger, "zz"), 2
    )
    assert "'zz' is not 32 bytes of hex" in line
    # an account, not a contract: the factory call has no code to run
    line = one_line_error(
        cli("app", "contract", "deploy", *chain, "--kms-contract", stranger, "--json")
    )
    assert line.startswith("Error: eth: deployAndRegisterApp(address,bool,bool,bool,bytes32,"
                           f"bytes32) on {stranger} failed: Could not transact")  # fmt: skip
    line = one_line_error(
        cli("kms", "contract", "show", "--eth-rpc-url", anvil.url, "--kms-contract", stranger)
    )
    assert line.startswith(f"Error: eth: owner on {stranger} failed: "), line
    down = ("--eth-rpc-url", "http://127.0.0.1:9", "--from", owner)
    line = one_line_error(cli("app", "contract", "add-device", *down, stranger, "01" * 32))
    assert line.startswith(f"Error: eth: addDevice on {stranger} failed: ")
    line = one_line_error(cli("kms", "contract", "deploy", "--eth-rpc-url", anvil.url), 2)
    assert "give exactly one of --private-key-file" in line
