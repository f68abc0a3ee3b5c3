"""`pydstack up --kms-auth eth --eth-rpc-url URL --kms-contract ADDR` as a process, with the
contract on anvil: refused in one line naming what the contract lacks, each value added with
`pydstack kms contract …` as an operator would, then serving."""

from __future__ import annotations

import re
from pathlib import Path

from web3 import Web3

from tests.cli.harness import Up

from .conftest import Anvil
from .test_cli_contract import ok

FIXES = {
    "os image": ("add-os-image",),
    "KMS aggregated MR": ("add-kms-measurement", "--mr-aggregated"),
    "KMS not allowed on device": ("add-kms-measurement", "--device-id"),
}


def _up(home: Path, url: str, contract: str) -> Up:
    return Up(home, extra=("--vmm", "none", "--dashboard-port", "-1", "--kms-auth", "eth",
                           "--eth-rpc-url", url, "--kms-contract", contract))  # fmt: skip


def _refusal(up: Up) -> str:
    assert up.proc is not None and up.proc.wait(30) == 1, up.text()
    [line] = [x for x in up.text().splitlines() if x.startswith("Error: ")]
    return line


def test_up_refuses_until_the_contract_lists_its_kms_then_serves(
    w3: Web3, anvil: Anvil, owner: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    chain = ("--eth-rpc-url", anvil.url, "--from", owner)
    kms = str(ok("kms", "contract", "deploy", *chain)["kms_contract"])
    refused = []
    for _ in range(len(FIXES) + 1):
        up = _up(home, anvil.url, kms)
        try:
            up.start()
        except AssertionError:
            line = _refusal(up)
            found = re.search(r"refused by backend eth \(bootAuth/kms\): (os image|KMS aggregated "
                              r"MR|KMS not allowed on device) (0x[0-9a-f]{64})", line)  # fmt: skip
            assert found, line
            refused.append(found.group(1))
            command, *option = FIXES[found.group(1)]
            ok("kms", "contract", command, *chain, "--kms-contract", kms, *option, found.group(2))
            continue
        try:
            ready = up.ready()
            assert ready is not None and ready.get("kms_auth") is None, ready  # not dev
            assert any(e.get("event") == "kms ready" and e.get("auth") == "eth"
                       for e in up.events()), up.text()  # fmt: skip
        finally:
            assert up.stop() == 0
        break
    else:
        raise AssertionError(f"up never served: refused for {refused}")
    assert refused == list(FIXES)
