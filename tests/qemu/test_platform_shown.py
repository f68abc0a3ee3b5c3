"""`pydstack status` and `vm info` show each host's platform, as its VMM announced it in
HostJoined (here: `up --vmm qemu` on a machine without TDX or working KVM: tcg, and why).

Cost: one `pydstack up` (embedded nats-server, scheduler, the qemu VMM; no KMS, gateway or
dashboard) and a handful of CLI processes: ~6 s. The whole test runs in a network namespace of
its own (as tests/boot/test_qemu_deploy.py does), so `up --vmm qemu`'s guest egress table
never touches the machine's ruleset; no QEMU is started, so it removes the table when it stops.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.harness import Up, cli, kill_processes_under, wait_for
from tests.netns import Netns, entered


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Up]:
    up = Up(tmp_path / "data", extra=("--vmm", "qemu", "--no-kms", "--dashboard-port", "-1",
                                      "--host-id", "h1"))  # fmt: skip
    # up, its nft table and every CLI call of the test live in this namespace
    with Netns.create("platform") as ns, entered(ns):
        try:
            yield up.start()
        finally:
            if up.proc is not None:
                up.stop()
            kill_processes_under(tmp_path)


def test_status_and_vm_info_show_the_hosts_platform(plane: Up) -> None:
    d = plane.data_dir
    info = json.loads(cli(d, "status", "--json").out)
    [host] = info["hosts"]
    assert host["host_id"] == "h1" and host["platform"] == "tcg", host
    assert host["platform_reason"].startswith("auto: no TDX (")
    assert "no KVM (the KVM probe guest did not boot" in host["platform_reason"]
    text = cli(d, "status").out
    assert "host       h1  platform tcg (auto: no TDX" in text, text
    # one HostJoined: `up` joined the host with the platform its VMM then found the same
    joined = [e for e in cli(d, "events", "--json", "--subject", "dstack.host.h1").lines()
              if e["type"] == "HostJoined"]  # fmt: skip
    assert len(joined) == 1, joined
    # an image this host lacks: placed (what vm info needs), never booted (no QEMU left over,
    # so `up` removes its guest egress table on exit)
    r = cli(d, "vm", "request", "--app-id", "app1", "--memory", "256M", "--vm-id", "vm-p",
            "--image", "no-such-image", "--json")  # fmt: skip
    assert r.code == 0, r.err

    def placed() -> dict[str, object] | None:
        got = json.loads(cli(d, "vm", "info", "vm-p", "--json").out)
        return got if got["host"] == "h1" else None

    vm = wait_for(placed, what="vm-p to be scheduled on h1")
    assert vm["platform"] == "tcg"
    assert "platform: tcg" in cli(d, "vm", "info", "vm-p").out
