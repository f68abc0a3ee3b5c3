"""examples/two-services on a sandbox CVM under `pydstack up --vmm sandbox --registry`
(issue 15, item 5): the real docker-compose honours the published port, the named volume and
the healthcheck that gates depends_on, with the image pulled from up's local registry, which
`pydstack image push` filled.

One `up` and one CVM for the module (~40 s on 2 cores): the test reads what the app shows,
then re-creates and restarts db's container through the CVM's own engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli.harness import Up, cli, free_host_port, kill_processes_under, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "two-services" / "docker-compose.yaml"
IMAGE = "pydstack-example/busybox:1"


def _get(port: int, path: str = "/") -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return ""


class Cvm:
    def __init__(self, home: Path, vm_id: str, port: int, digest: str) -> None:
        self.home, self.vm_id, self.port, self.digest = home, vm_id, port, digest
        run = json.loads((home / "vmm" / "vms" / vm_id / "sandbox.json").read_text())
        self.docker_host = f"unix://{run['run_dir']}/docker.sock"
        self.compose_dir = home / "vmm" / "vms" / vm_id / "compose"

    def docker(self, *args: str) -> str:
        r = subprocess.run(["docker", "-H", self.docker_host, *args], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stdout

    def inspect(self, name: str) -> Any:
        return json.loads(self.docker("inspect", name))[0]

    def compose_up(self) -> None:
        """What the guest ran at boot, again (its files, its engine)."""
        r = subprocess.run(
            ["docker-compose", "--ansi", "never", "-p", "dstack", "--project-directory",
             str(self.compose_dir), "-f", "docker-compose.yaml", "-f", "pydstack-override.json",
             "up", "-d"], cwd=self.compose_dir, capture_output=True, text=True, timeout=120,
            env={"PATH": os.environ["PATH"], "DOCKER_HOST": self.docker_host},
        )  # fmt: skip
        assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def cvm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cvm]:
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        pytest.skip("sandbox CVMs need root and dockerd (docker.io)")
    for tool in ("docker-compose", "docker-registry"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: `make deps` installs it")
    home = tmp_path_factory.mktemp("two") / "home"
    plane = Up(home, extra=("--vmm", "sandbox", "--no-gateway", "--registry",
                            "--dashboard-port", "-1")).start()  # fmt: skip
    try:
        pushed = cli(home, "image", "push", "busybox", IMAGE, "--json")
        assert pushed.code == 0, pushed.err
        [doc] = pushed.lines()
        port = free_host_port()
        r = cli(home, "deploy", str(EXAMPLE), "--port", f"{port}:8080", "--vm-id", "two1",
                "--timeout", "150", timeout=200)  # fmt: skip
        assert r.code == 0, r.out + r.err
        yield Cvm(home, "two1", port, doc["digest"])
    finally:
        cli(home, "vm", "rm", "two1")
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not (home / "vmm" / "vms" / "two1").exists(), timeout=40,
                     what="two1 removed")  # fmt: skip
        plane.stop()
        kill_processes_under(home)  # the CVMs' supervisor outlives up by design


def test_the_published_port_answers_with_what_web_read_from_db(cvm: Cvm) -> None:
    """web's page (port 8080 published by compose, mapped to a host port) shows the counter it
    read from db over the app's network at its start; db itself is published nowhere."""
    body = wait_for(lambda: _get(cvm.port), timeout=30, what="web to answer")
    assert body == "db boots at web start: 1\n"
    assert _get(cvm.port, "/cgi-bin/db").strip() == "1"
    db = cvm.inspect("dstack_db_1")
    assert db["NetworkSettings"]["Ports"] in ({}, {"80/tcp": None}), db["NetworkSettings"]
    assert list(db["NetworkSettings"]["Networks"]) == ["dstack_default"]  # not host networking


def test_the_healthcheck_gates_web_until_db_is_healthy(cvm: Cvm) -> None:
    """db's server (and so its healthcheck) comes 2 s after db starts; web started after db's
    first passing check, which is why its start-time read got the counter, not 'unreachable'."""
    db, web = cvm.inspect("dstack_db_1"), cvm.inspect("dstack_web_1")
    assert db["State"]["Health"]["Status"] == "healthy"
    first_pass = min(h["End"] for h in db["State"]["Health"]["Log"] if h["ExitCode"] == 0)
    assert web["State"]["StartedAt"][:26] >= first_pass[:26], (web["State"], first_pass)
    assert web["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"


def test_the_image_was_pulled_from_ups_registry_by_the_pushed_digest(cvm: Cvm) -> None:
    image = json.loads(cvm.docker("image", "inspect", IMAGE))[0]
    assert f"pydstack-example/busybox@{cvm.digest}" in image["RepoDigests"]


def test_the_named_volume_outlives_db_containers(cvm: Cvm) -> None:
    """db counts its starts on the volume: a restart and a re-created container (fresh
    filesystem) both see the count go on."""
    assert "dstack_data" in cvm.docker("volume", "ls", "-q").split()
    before = cvm.inspect("dstack_db_1")["Id"]
    cvm.docker("rm", "-f", "dstack_db_1")
    cvm.compose_up()
    assert cvm.inspect("dstack_db_1")["Id"] != before
    wait_for(lambda: _get(cvm.port, "/cgi-bin/db").strip() == "2", timeout=30,
             what="db's count after re-creation")  # fmt: skip
    cvm.docker("restart", "-t", "1", "dstack_db_1")
    wait_for(lambda: _get(cvm.port, "/cgi-bin/db").strip() == "3", timeout=30,
             what="db's count after a restart")  # fmt: skip
