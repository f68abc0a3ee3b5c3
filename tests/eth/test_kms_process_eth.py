"""`python -m pydstack.actors.kms --auth eth --eth-rpc-url URL --kms-contract ADDR` as a process:
it asks dstack's DstackKms (on anvil) about itself, and exits 1 with one line naming what the
contract lacks (the serving path: test_kms_launch_eth.py, test_sandbox_eth.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pydstack.adapters.nats import NatsServer
from pydstack.adapters.secretfile import write_secret
from pydstack.adapters.tdx.pki import DevPki
from pydstack_guest import create_dev_app_keys
from tests.kms import conftest as rig

from .conftest import Anvil, Deployment

pki = rig.pki


@pytest.mark.parametrize("deployed", ["dstack"], indirect=True)
def test_kms_process_refused_by_the_contract_exits_with_one_line(
    nats_server: NatsServer, pki: DevPki, tmp_path: Path, anvil: Anvil, deployed: Deployment
) -> None:
    seed, appkeys = tmp_path / "kms.seed", tmp_path / "appkeys.json"
    write_secret(seed, os.urandom(32).hex())
    appkeys.write_text(create_dev_app_keys(b"kms-proc".ljust(20, b"\0"), now=0)[1])
    pki.save(tmp_path / "pki")
    deployed.kms.remove_os_image("00" * 32)  # the dev KMS runs no registered image
    done = subprocess.run(
        [sys.executable, "-m", "pydstack.actors.kms", "--nats", nats_server.url,
         "--key-file", str(tmp_path / "root.sealed"), "--seal-appkeys", str(appkeys),
         "--dev-pki", str(tmp_path / "pki"), "--port", "0", "--signer-seed-file", str(seed),
         "--auth", "eth", "--eth-rpc-url", anvil.url, "--kms-contract", deployed.kms.address],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and not done.stdout, done
    errors = [x for x in done.stderr.splitlines() if x.startswith("Error:")]
    assert errors == [
        "Error: KMS self-authorization refused by backend eth (bootAuth/kms): os image "
        f"0x{'00' * 32} not allowed"
    ], done.stderr
