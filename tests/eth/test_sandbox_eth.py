"""Issue 15's "done when" for on-chain authorization: `pydstack up --vmm sandbox --kms-auth eth`
against a DstackKms on anvil. `up` refuses to start, in one line, until the contract lists its
KMS (OS image, MR, device: each added with `pydstack kms contract`). Then a CVM whose app id is
its DstackApp's address boots and serves while the contract allows its compose hash; once the
owner removes the hash on chain, the next boot gets a KeyDenied naming it (a VmBootError at the
keys step, no key)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from web3 import Web3

from tests import vmmapi
from tests.cli.harness import Up, cli, free_host_port, kill_processes_under, wait_for

from .conftest import Anvil
from .test_cli_contract import ok

# what a refused KMS names -> the `pydstack kms contract` command an operator then runs
FIXES = {
    "os image": ("add-os-image",),
    "KMS aggregated MR": ("add-kms-measurement", "--mr-aggregated"),
    "KMS not allowed on device": ("add-kms-measurement", "--device-id"),
}

COMPOSE = json.dumps({
    "manifest_version": 2, "name": "chain-app", "runner": "docker-compose", "kms_enabled": True,
    "docker_compose_file": "services:\n  web:\n    image: busybox:latest\n    command: [sh, -c,"
    " 'echo on-chain > /tmp/index.html; exec httpd -f -p 8080 -h /tmp']\n"
    "    ports: ['8080:8080']\n",
}).encode()  # fmt: skip


def _get(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def _events(home: Path, subject: str) -> list[dict[str, Any]]:
    r = cli(home, "events", "--subject", subject, "--json")
    assert r.code == 0, r.err
    return r.lines()


def _serving_plane(home: Path, anvil: Anvil, kms: str, chain: tuple[str, ...]) -> Up:
    """`up` with the eth backend, after allow-listing what its KMS's refusals name: each start
    fails in one line naming the next value the DstackKms lacks (its isKmsAllowed order)."""
    refused = []
    for _ in range(len(FIXES) + 1):
        plane = Up(home, extra=("--vmm", "sandbox", "--no-gateway", "--dashboard-port", "-1",
                                "--kms-auth", "eth", "--eth-rpc-url", anvil.url,
                                "--kms-contract", kms))  # fmt: skip
        try:
            plane.start()
        except AssertionError:
            assert plane.proc is not None and plane.proc.wait(30) == 1, plane.text()
            found = re.search(r"\(bootAuth/kms\): (os image|KMS aggregated MR|KMS not allowed "
                              r"on device) (0x[0-9a-f]{64})", plane.text())  # fmt: skip
            assert found, plane.text()
            assert len([x for x in plane.text().splitlines() if x.startswith("Error: ")]) == 1
            refused.append(found.group(1))
            command, *option = FIXES[found.group(1)]
            ok("kms", "contract", command, *chain, "--kms-contract", kms, *option, found.group(2))
            continue
        assert refused == list(FIXES)
        assert any(e.get("event") == "kms ready" and e.get("auth") == "eth"
                   for e in plane.events()), plane.text()  # fmt: skip
        return plane
    raise AssertionError(f"up never served: refused for {refused}")


def test_a_compose_hash_removed_on_chain_is_denied_at_the_next_boot(
    w3: Web3, anvil: Anvil, owner: str, tmp_path: Path
) -> None:
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.skip("sandbox CVMs need root and dockerd (docker.io)")
    home = tmp_path / "home"
    chain = ("--eth-rpc-url", anvil.url, "--from", owner)
    kms = str(ok("kms", "contract", "deploy", *chain)["kms_contract"])
    plane = _serving_plane(home, anvil, kms, chain)
    vm_id, port = "chain1", free_host_port()
    try:
        [image] = cli(home, "image", "registered", "--json").lines()
        ok("kms", "contract", "add-os-image", *chain, "--kms-contract", kms,
           str(image["os_image_hash"]))  # fmt: skip
        compose_file = tmp_path / "app-compose.json"
        compose_file.write_bytes(COMPOSE)
        app = ok("app", "contract", "deploy", *chain, "--kms-contract", kms, "--compose",
                 str(compose_file), "--allow-any-device")  # fmt: skip
        app_id = str(app["app_id"])
        state = json.loads((home / "state.json").read_text())
        assert (state["kms_auth"], state["kms_contract"]) == ("eth", kms)
        vmm = state["vmm_url"]
        vmmapi.call(vmm, "CreateVm", {
            "id": vm_id, "name": vm_id, "image": str(image["name"]), "vcpu": 1, "memory": 256,
            "app_id": app_id, "compose_file": COMPOSE.decode(),
            "ports": [{"host_port": port, "vm_port": 8080}]})  # fmt: skip
        assert wait_for(lambda: _get(port), timeout=90, what="the app to serve").strip() == (
            "on-chain"
        )
        issued = [e["body"] for e in _events(home, "dstack.kms.*") if e["type"] == "KeyIssued"]
        assert [i["boot_info"]["app_id"] for i in issued] == [app_id]

        ok("app", "contract", "remove-compose-hash", *chain, app_id, "--compose",
           str(compose_file))  # fmt: skip
        vmmapi.call(vmm, "StopVm", {"id": vm_id})
        wait_for(lambda: not _get(port), timeout=30, what="the app to stop")
        vmmapi.call(vmm, "StartVm", {"id": vm_id})

        def boot_error() -> list[dict[str, Any]]:
            events = _events(home, f"dstack.vm.{vm_id}")
            return [e for e in events if e["type"] == "VmBootError"]

        [error] = wait_for(boot_error, timeout=60, what="the VmBootError of the second boot")
        want = f"compose hash 0x{hashlib.sha256(COMPOSE).hexdigest()} not allowed for app 0x"
        assert "boot error at keys" in error["body"]["error"], error
        assert want in error["body"]["error"], error
        denied = [e["body"] for e in _events(home, "dstack.kms.*") if e["type"] == "KeyDenied"]
        assert [d["boot_info"]["app_id"] for d in denied] == [app_id]
        assert want in denied[0]["reason"]
        assert not _get(port)
    finally:
        with contextlib.suppress(Exception):
            vmm_url = json.loads((home / "state.json").read_text())["vmm_url"]
            vmmapi.call(vmm_url, "RemoveVm", {"id": vm_id})
            wait_for(lambda: any(e["type"] == "VmRemoved"
                                 for e in _events(home, f"dstack.vm.{vm_id}")),
                     timeout=30, what="the VM removed")  # fmt: skip
        stopped = plane.stop()
        kill_processes_under(home)  # the CVMs' supervisor outlives up by design
        assert stopped == 0
