"""`pydstack up` runs a KMS; a simulated guest boots on its keys and the decision is on the log."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from tests.cli.harness import PYDSTACK, Up, cli, wait_for


def test_simulated_guest_gets_keys_from_the_kms_of_up(tmp_path: Path) -> None:
    home = tmp_path / "home"
    plane = Up(home).start()
    sim_log = tmp_path / "sim.log"
    try:
        kms_url = plane.ready()["kms"]  # type: ignore[index]
        assert kms_url.startswith("https://127.0.0.1:")
        compose = tmp_path / "app-compose.json"
        compose.write_text('{"manifest_version":2,"name":"demo","runner":"docker-compose"}')
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYDSTACK_")}
        with sim_log.open("wb") as f:
            sim = subprocess.Popen(
                [PYDSTACK, "attest", "simulate", "--state", str(tmp_path / "sim"),
                 "--socket", str(tmp_path / "d.sock"), "--compose", str(compose),
                 "--kms", kms_url, "--dev-pki", str(home / "dev-pki")],
                stdout=f, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        try:
            wait_for(lambda: "app keys from" in sim_log.read_text() or sim.poll() is not None,
                     timeout=30, what="the simulated guest to get its keys")  # fmt: skip
            assert sim.poll() is None, sim_log.read_text()
        finally:
            sim.terminate()
            sim.wait(timeout=10)
        r = cli(home, "events", "--subject", "dstack.kms.*", "--json")
        assert r.code == 0, r.err
        types = [e["type"] for e in r.lines()]
        assert types[:1] == ["KmsRootCreated"] and types[-2:] == ["KeyRequested", "KeyIssued"]
        issued = r.lines()[-1]["body"]
        app_id = hashlib.sha256(compose.read_bytes()).hexdigest()[:40]
        assert issued["boot_info"]["app_id"] == app_id
        assert issued["boot_info"]["tcb_status"] == "UpToDate"
        assert cli(home, "audit").code == 0
    finally:
        assert plane.stop() == 0
