"""`pydstack deploy examples/hello` against `pydstack up --vmm qemu`: the same flow as
test_gateway_deploy on the sandbox backend, in a real QEMU TCG guest booted from the image of
`make image`. One boot (40-120 s under TCG on these machines).

The guest runs pydstack_guest's boot flow (``pydstack_guest.image_boot``) on a simulated TD
whose quotes are signed with up's dev PKI (handed over in the host share): RTMR3
measurements, keys from up's KMS over RA-TLS (reached from slirp through an in-guest relay on
the URL's own address), the sealed env decrypted, registration at up's gateway and a
wireguard-go tunnel to it, then the compose app on the guest's docker engine. The page comes
back over HTTPS through the gateway, carrying what the guest measured and decrypted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pydstack.adapters.qemu import Image
from tests.cli.harness import Up, cli, free_host_port, wait_for

from .test_gateway_deploy import (
    EXAMPLE,
    _check_quote,
    _cleanup,
    _events,
    _get,
    _line,
    _ours,
)

REPO = Path(__file__).resolve().parents[2]
IMAGE = "pydstack-dev"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _image() -> Image:
    """The guest image of `make image`, built when missing or stale; a skip says why not."""
    if os.geteuid() != 0:
        pytest.skip("building the guest image (mmdebstrap, mkfs.ext4 -d) needs root")
    for tool in ("qemu-system-x86_64", "mmdebstrap", "wireguard-go", "busybox"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not found: the QEMU flow needs it (make sysdeps)")
    # The harness starts `up` without PYDSTACK_* variables: build where that `up` looks.
    env = {k: v for k, v in os.environ.items() if k != "PYDSTACK_IMAGE_CACHE"}
    r = subprocess.run(["bash", str(REPO / "image" / "build.sh")], capture_output=True,
                       text=True, env=env)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"the guest image cannot be built: {r.stderr.strip()[-300:]}")
    img = Image.load(Path.home() / ".cache" / "pydstack" / "images" / IMAGE)
    img.verify()
    return img


def _qemu_pids(home: Path) -> list[int]:
    return [p for p in _ours(home) if b"qemu-system" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_example_deployed_on_qemu_is_served_over_https_through_the_gateway(
    short_tmp: Path,
) -> None:
    """deploy says reachable; the page carries the app id the guest measured, the instance id
    the gateway registered and the env var deploy sealed; the app's quote verifies; the boot
    ran dstack's steps in order inside the guest; removing the VM leaves no QEMU."""
    image = _image()
    home = short_tmp / "home"
    plane = Up(home, extra=("--vmm", "qemu", "--gateway", "--dashboard-port", "-1")).start()
    try:
        state = json.loads((home / "state.json").read_text())
        proxy, ca, domain = state["gateway_proxy"], state["gateway_ca"], state["gateway_domain"]
        greeting = f"hi-{random.randrange(10**9)}"
        (short_tmp / "hello.env").write_text(f"GREETING={greeting}\n")
        t0 = time.monotonic()
        r = cli(home, "deploy", str(EXAMPLE), "--env-file", str(short_tmp / "hello.env"),
                "--port", f"{free_host_port()}:8080", "--vm-id", "hello1", "--image", IMAGE,
                "--vcpu", "2", "--memory", "1536M", "--timeout", "600", timeout=660)  # fmt: skip
        print(f"deploy on QEMU TCG: {time.monotonic() - t0:.0f} s")
        wd = home / "vmm" / "vms" / "hello1"
        assert r.code == 0, r.out + r.err + _tail(wd / "serial.log")
        app_id, compose_hash = _line(r.out, "app id"), _line(r.out, "compose hash")
        url = _line(r.out, "url")
        assert re.fullmatch(rf"https://{app_id}-8080\.{re.escape(domain)}(:\d+)?", url), url
        assert f"reachable    {url} (HTTP 200 through the gateway)" in r.out

        status, body = _get(proxy, url, ca)
        regs = [e["body"] for e in _events(home, "dstack.*.*") if e["type"] == "CvmRegistered"
                and e["body"]["app_id"] == app_id]  # fmt: skip
        assert status == 200
        assert body.splitlines()[:4] == ["hello from pydstack", f"app {app_id}",
                                         f"instance {regs[0]['instance_id']}",
                                         f"GREETING={greeting}"]  # fmt: skip
        # The app's quote CGI asks the guest agent (its loopback TCP API) for a quote over our
        # report_data: `attest verify` accepts it as this app's CVM, a tampered copy not.
        _check_quote(home, short_tmp, proxy, url, ca,
                     {"app_id": app_id, "compose_hash": compose_hash,
                      "instance_id": regs[0]["instance_id"]})  # fmt: skip
        progress = [e["body"] for e in _events(home, "dstack.vm.hello1")
                    if e["type"] == "VmBootProgress"]  # fmt: skip
        stages = [p["stage"] for p in progress]
        # The QEMU guest's own stages, then dstack's order: keys, env, gateway, docker, app.
        assert stages[:2] == ["booted", "network"], stages
        assert stages.index("keys") < stages.index("env") < stages.index("gateway")
        assert stages.index("gateway") < stages.index("docker") < stages.index("app")
        assert stages[-1] == "ready"
        storage = next(p["detail"] for p in progress if p["stage"] == "storage")
        assert "NOT encrypted" in storage, storage  # no LUKS2 data disk yet: measured plain
        keys = next(p["detail"] for p in progress if p["stage"] == "keys")
        assert keys.startswith("kms ") and state["kms_url"] in keys, keys
        # Up's KMS verified the guest's quote and event log: this app, and the os-image-hash
        # the guest measured is the digest of the image QEMU booted.
        issued = [
            e["body"]["boot_info"]
            for e in _events(home, "dstack.*.*")
            if e["type"] == "KeyIssued" and e["body"]["boot_info"]["app_id"] == app_id
        ]
        assert [b["os_image_hash"] for b in issued] == [image.digest], issued
        assert _qemu_pids(home), "no QEMU process for the deployed VM"
    finally:
        cli(home, "vm", "rm", "hello1")
        with contextlib.suppress(AssertionError):
            wait_for(lambda: any(e["type"] == "VmRemoved"
                                 for e in _events(home, "dstack.vm.hello1")),
                     timeout=60, what="hello1 removed")  # fmt: skip
        left = _qemu_pids(home)
        stopped = plane.stop()
        _cleanup(short_tmp, {})  # the supervisor (it outlives up by design) and any leftover
        assert stopped == 0, plane.text()
        assert left == [], f"QEMU left running after vm rm: {left}"
        tag = hashlib.sha256(str(home).encode()).hexdigest()[:8]
        gw = subprocess.run(["pgrep", "-f", f"wireguard-go -f dgw{tag}"], capture_output=True)
        assert gw.stdout == b"", "up's gateway left its wireguard-go"


def _tail(path: Path, n: int = 60) -> str:
    with contextlib.suppress(OSError):
        return "\n--- " + str(path) + "\n" + "\n".join(path.read_text(errors="replace")
                                                     .splitlines()[-n:])  # fmt: skip
    return ""
