"""`pydstack deploy examples/hello` against `pydstack up --vmm qemu`: the same flow as
test_gateway_deploy on the sandbox backend, in a real QEMU TCG guest booted from the image of
`make image`. Two boots (each 40-120 s under TCG on these machines): the deploy, then a
restart that must open the LUKS2 data disk the first boot formatted.

The guest runs pydstack_guest's boot flow (``pydstack_guest.image_boot``) on a simulated TD
whose quotes are signed with up's dev PKI (handed over in the host share): RTMR3
measurements, keys from up's KMS over RA-TLS (reached from slirp through an in-guest relay on
the URL's own address), the sealed env decrypted, registration at up's gateway and a
wireguard-go tunnel to it, then the compose app on the guest's docker engine. The page comes
back over HTTPS through the gateway, carrying what the guest measured and decrypted. The
docker state lives on the VM's data disk, LUKS2 with the app's disk key from the KMS: the host
sees only ciphertext there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import random
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pydstack.adapters.qemu import Image
from pydstack_guest.data_disk import validate_luks2_header
from tests.cli.harness import Up, cli, free_host_port, wait_for
from tests.netns import Netns, entered
from tests.qemu.guest_image import IMAGE, built_image

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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # two TCG boots on a busy machine


@pytest.fixture
def image() -> Image:
    return built_image()


@pytest.fixture
def deploy_netns(image: Image) -> Iterator[Netns]:
    """The whole deploy in a namespace of its own (up, its gateway and KMS, the CLI, QEMU),
    entered once the image is built (that needs the network): up's VMM applies its guest
    egress rules there, never to the machine's ruleset, and the guest boots behind them."""
    with Netns.create("qemu-deploy") as ns, entered(ns):
        yield ns


def _qemu_pids(home: Path) -> list[int]:
    return [p for p in _ours(home) if b"qemu-system" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_example_deployed_on_qemu_is_served_over_https_through_the_gateway(
    short_tmp: Path, image: Image, deploy_netns: Netns
) -> None:
    """deploy says reachable; the page carries the app id the guest measured, the instance id
    the gateway registered and the env var deploy sealed; the app's quote verifies; the boot
    ran dstack's steps in order inside the guest; removing the VM leaves no QEMU."""
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
        assert storage.startswith("LUKS2 (dm-crypt, aes-xts-plain64) with the disk key: "
                                  "formatted /dev/vd"), storage  # fmt: skip
        assert "ext4 at /dstack/persistent" in storage, storage
        keys = next(p["detail"] for p in progress if p["stage"] == "keys")
        assert keys.startswith("kms ") and state["kms_url"] in keys, keys
        # Up's KMS verified the guest's quote and event log: this app, and the os-image-hash
        # the guest measured is the digest of the image QEMU booted, whose registered
        # measurements for the VM's shape the quote showed (GetAppKey, then SignCert for the
        # gateway client certificate).
        issued = [
            e["body"]
            for e in _events(home, "dstack.*.*")
            if e["type"] == "KeyIssued" and e["body"]["boot_info"]["app_id"] == app_id
        ]
        assert issued and {b["boot_info"]["os_image_hash"] for b in issued} == {image.digest}
        assert all("MRTD, RTMR0-2 match" in b["image_check"] for b in issued), issued
        assert _qemu_pids(home), "no QEMU process for the deployed VM"
        _check_guest_egress_rules(state)
        _check_data_disk_and_restart(home, wd, greeting, storage, proxy, url, ca)
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


def _check_guest_egress_rules(state: dict[str, Any]) -> None:
    """The guest booted behind up's rules: its QEMU user may open up's KMS and gateway
    registration ports (TCP) and the gateway's WireGuard port (UDP) on this host, no other."""
    table = subprocess.run(["nft", "list", "table", "inet", "pydstack_guest_egress"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip

    def opened(proto: str) -> set[int]:
        m = re.search(rf"{proto} dport (?:\{{ )?([\d, ]+?)(?: \}})? accept", table)
        return {int(x) for x in m.group(1).split(",")} if m else set()

    kms = int(state["kms_url"].rsplit(":", 1)[1])
    registration = int(state["gateway_registration_url"].rsplit(":", 1)[1])
    assert opened("tcp") - {53} == {kms, registration}, table
    assert opened("udp") - {53} == {state["gateway_wireguard_port"]}, table


def _stages(home: Path) -> list[dict[str, Any]]:
    return [e["body"] for e in _events(home, "dstack.vm.hello1") if e["type"] == "VmBootProgress"]


def _poll(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """`wait_for` every 3 s: each look is a CLI process, CPU the TCG guest needs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(3)
    raise AssertionError(f"timed out waiting for {what}")


def _check_data_disk_and_restart(
    home: Path, wd: Path, greeting: str, storage: str, proxy: str, url: str, ca: str
) -> None:
    """After a graceful stop the data disk file is LUKS2 (a header the guest would accept) and
    neither disk file holds the app's plaintext (the env docker keeps in the container's
    config, the page the app wrote); a restart opens the same disk with the same key (no new
    format: the marker written at format is read back) and the app serves again."""
    t0 = time.monotonic()
    r = cli(home, "vm", "stop", "hello1")
    assert r.code == 0, r.out + r.err
    _poll(lambda: any(e["type"] == "VmStopped" for e in _events(home, "dstack.vm.hello1")),
          timeout=120, what="hello1 stopped")  # fmt: skip
    print(f"graceful stop: {time.monotonic() - t0:.0f} s")
    head = wd / "data-head.raw"
    subprocess.run(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", "bs=1M", "count=16",
                    f"if={wd / 'data.qcow2'}", f"of={head}"], check=True)  # fmt: skip
    hdr = head.read_bytes()
    assert hdr[:8] == b"LUKS\xba\xbe\x00\x02", hdr[:8]  # LUKS2 magic + version 2
    validate_luks2_header(hdr)  # cryptsetup's real header passes the guest's own checks
    for name in ("data.qcow2", "disk.qcow2"):
        with (wd / name).open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert m.find(greeting.encode()) == -1, f"{greeting} in plaintext in {name}"
    first_ready = sum(p["stage"] == "ready" for p in _stages(home))
    t0 = time.monotonic()
    r = cli(home, "vm", "start", "hello1")
    assert r.code == 0, r.out + r.err
    stages = _poll(lambda: (st := _stages(home)) and sum(p["stage"] == "ready" for p in st)
                   > first_ready and st, timeout=600, what="hello1 ready again")  # fmt: skip
    print(f"restart to ready on QEMU TCG: {time.monotonic() - t0:.0f} s")
    assert not any(p["stage"] == "error" for p in stages), stages
    second = [p["detail"] for p in stages if p["stage"] == "storage"][-1]
    print(f"data disk, first boot: {storage}\n           restart: {second}")
    assert ": opened /dev/vd" in second and ": formatted" not in second, second
    since = re.search(r"\(formatted at \d+\)", storage)
    assert since and since.group(0) in second, (storage, second)
    _, body = _poll(lambda: (got := _try_get(proxy, url, ca)) and got[0] == 200 and got,
                    timeout=120, what="the app served again")  # fmt: skip
    assert f"GREETING={greeting}" in body


def _try_get(proxy: str, url: str, ca: str) -> tuple[int, str] | None:
    try:
        return _get(proxy, url, ca)
    except OSError:
        return None


def _tail(path: Path, n: int = 60) -> str:
    with contextlib.suppress(OSError):
        return "\n--- " + str(path) + "\n" + "\n".join(path.read_text(errors="replace")
                                                     .splitlines()[-n:])  # fmt: skip
    return ""
