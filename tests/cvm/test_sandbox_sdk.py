"""Both dstack SDKs against a booted sandbox CVM's agent sockets (issue 16, item 2).

A sandbox CVM boots (local dev keys, simulated TD); the test drives every call of dstack-sdk
(Python) and of @phala/dstack-sdk (node) on the sockets the CVM serves, where dstack has
them, and checks what its container sees (the three socket paths) and the CVM's
``/run/log/dstack/runtime_events.log`` (under the sandbox's work dir)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pydstack.adapters.cvm import CvmBackend, CvmSpec
from pydstack.adapters.sandbox import SandboxBackend, SandboxConfig, build_busybox_image
from pydstack.adapters.tdx.collateral import collateral_from_json
from pydstack.adapters.tdx.eventlog import parse_json_event_log
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.verify import Policy, verify_quote
from pydstack_guest import LocalKeyProvider
from tests.guest.jssdk import check_js_results, run_js_sdk
from tests.guest.pysdk import run_py_sdk
from tests.guest.tlscheck import option_matrix

from .contract import Host, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandbox CVMs need root")

# The container shows what it was given, then serves (the ready check needs nothing else).
SOCKETS = ("/var/run/dstack.sock", "/var/run/dstack/dstack.sock", "/var/run/tappd.sock")
COMPOSE = json.dumps({"services": {"web": {"image": "busybox:latest", "command": [
    "sh", "-c", f"ls -l {' '.join(SOCKETS)}; exec httpd -f -p 8080 -h /www"]}}})  # fmt: skip


@pytest.fixture
async def cvm(tmp_path: Path) -> AsyncIterator[tuple[CvmBackend, Path, Path]]:
    if shutil.which("dockerd") is None:
        pytest.fail("dockerd is missing: `make deps` installs docker.io")
    images = tmp_path / "images"
    build_busybox_image(images)
    cfg = SandboxConfig(vms_dir=tmp_path / "vms", images=images,
                        run_root=Path("/run/pydstack-test") / tmp_path.name)  # fmt: skip
    host = Host(tmp_path, lambda sv: SandboxBackend(cfg, sv))
    backend = await host.start()
    try:
        compose = json.dumps({"name": "sdk", "docker_compose_file": COMPOSE}).encode()
        await backend.create(CvmSpec(vm_id="sdk1", image="sandbox-busybox", vcpu=1,
                                     memory_mb=256, cid=1700, app_compose=compose))  # fmt: skip
        await backend.start("sdk1")
        await wait_for(backend, "sdk1", lambda s: s.boot_stage == "ready", 60)
        assert isinstance(backend, SandboxBackend)
        yield backend, backend.workdir("sdk1"), cfg.run_root / backend._short("sdk1")
    finally:
        await host.close()
        shutil.rmtree(cfg.run_root, ignore_errors=True)


async def test_both_sdks_on_a_booted_cvm(cvm: tuple[CvmBackend, Path, Path]) -> None:
    """Every call of both SDKs passes on the booted CVM's sockets (dstack.sock, its
    dstack/dstack.sock alias, tappd.sock); its container has all three at dstack's paths;
    runtime_events.log lists the boot's events and the SDKs' EmitEvents."""
    _backend, wd, rd = cvm
    pki = DevPki.load(wd / "sim" / "pki")
    keys = await LocalKeyProvider(wd / "sim" / "appkeys.json").app_keys()
    now = int(time.time())
    collateral = collateral_from_json(pki.collateral_json(now))

    def verify(quote: bytes, log: str) -> list[str]:
        v = verify_quote(quote, collateral, Policy(), now, pki.root_der,
                         event_log=parse_json_event_log(log))  # fmt: skip
        return list(v.reasons)

    options = option_matrix(now)
    info_app_id = None
    for run, sock in ((run_py_sdk, rd / "dstack.sock"), (run_js_sdk, rd / "dstack" / "dstack.sock"),
                      (run_js_sdk, rd / "dstack.sock")):  # fmt: skip
        r = await run(str(sock), str(rd / "tappd.sock"), options)
        info_app_id = bytes.fromhex(r["info"]["app_id"])
        check_js_results(r, options, verify=verify, app_id=info_app_id,
                         kms_root=keys.kms_root_public, chain_len=2, tappd=True)  # fmt: skip
    console = (wd / "console.log").read_text()
    for path in SOCKETS:
        listed = [x for x in console.splitlines() if x.endswith(" " + path)]
        assert listed and listed[0].startswith("[web] s"), console  # a socket, at that path
    log = wd / "run" / "log" / "dstack" / "runtime_events.log"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    names = [x["event"] for x in lines]
    assert names[:2] == ["system-preparing", "app-id"] and "system-ready" in names
    assert base64.b64decode(lines[1]["payload"]) == info_app_id
    assert names.count("js-event") == 3  # one EmitEvent per SDK run, in RTMR3's order
