"""`running_kms` with `auth="eth"` (what `up --kms-auth eth` and `python -m pydstack.actors.kms
--auth eth` pass): the KMS asks the contract's isKmsAllowed about itself before it serves, and
refuses to start, in one line, on a bad address, an unreachable node or a refusal."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from pydstack.actors.kms.launch import KmsLaunch, LaunchError, running_kms
from pydstack.adapters.nats import EventStore
from pydstack.adapters.tdx.pki import DevPki
from pydstack_guest import create_dev_app_keys
from tests.kms import conftest as rig

from .conftest import Anvil, Deployment

pki = rig.pki


def launch(tmp: Path, pki: DevPki, rpc_url: str, contract: str) -> KmsLaunch:
    appkeys = tmp / "appkeys.json"
    if not appkeys.exists():
        appkeys.write_text(create_dev_app_keys(b"kms-eth".ljust(20, b"\0"), now=0)[1])
        pki.save(tmp / "pki")
    return KmsLaunch(
        key_file=str(tmp / "root.sealed"), cluster="main", seal_appkeys=str(appkeys),
        auth="eth", eth_rpc_url=rpc_url, kms_contract=contract, dev_pki=str(tmp / "pki"),
        instance_id="kms-eth",
    )  # fmt: skip


@pytest.mark.parametrize("deployed", ["dstack"], indirect=True)
async def test_kms_starts_once_the_contract_lists_its_measurements(
    store: EventStore, pki: DevPki, tmp_path: Path, anvil: Anvil, deployed: Deployment
) -> None:
    """Each refusal names the value to allow-list (as `pydstack kms contract add-os-image` /
    `add-kms-measurement` then do); once all are listed the KMS serves."""
    opts = launch(tmp_path, pki, anvil.url, deployed.kms.address)
    fixes = {
        "os image": deployed.kms.add_os_image,
        "KMS aggregated MR": deployed.kms.add_kms_mr,
        "KMS not allowed on device": deployed.kms.add_kms_device,
    }
    refused = []
    for _ in range(len(fixes) + 1):
        try:
            async with running_kms(store, opts) as url:
                assert url.startswith("https://127.0.0.1:")
                break
        except LaunchError as exc:
            found = re.search(r"isKmsAllowed|(os image|KMS aggregated MR|KMS not allowed on "
                              r"device) (0x[0-9a-f]{64})", str(exc))  # fmt: skip
            assert found and found.group(1), exc
            assert "\n" not in str(exc)
            refused.append(found.group(1))
            fixes[found.group(1)](found.group(2))
    else:
        raise AssertionError(f"the KMS never started: refused for {refused}")
    assert refused == ["os image", "KMS aggregated MR", "KMS not allowed on device"]


@pytest.mark.parametrize(
    ("rpc_url", "contract", "error"),
    [
        ("http://127.0.0.1:8545", "0x1234", "--kms-contract '0x1234' is not a contract address"),
        ("ws://127.0.0.1:8545", "0x" + "11" * 20, "--eth-rpc-url 'ws://127.0.0.1:8545' must be"),
    ],
)
async def test_bad_eth_options_refuse_to_start(
    store: EventStore, pki: DevPki, tmp_path: Path, rpc_url: str, contract: str, error: str
) -> None:
    with pytest.raises(LaunchError, match=re.escape(error)):
        async with running_kms(store, launch(tmp_path, pki, rpc_url, contract)):
            pass


async def test_unreachable_node_refuses_to_start_in_one_line(
    store: EventStore, pki: DevPki, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = launch(tmp_path, pki, f"http://127.0.0.1:{port}", "0x" + "11" * 20)
    with pytest.raises(LaunchError) as err:
        async with running_kms(store, opts):
            pass
    text = str(err.value)
    assert "isKmsAllowed on KMS contract 0x1111111111111111111111111111111111111111" in text
    assert "check the RPC endpoint" in text and "\n" not in text
