"""QEMU runs as its own unprivileged user with its CVM's files and nothing more
(``adapters.qemu.user``): a guest that breaks out into QEMU holds no root and no key."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pydstack.adapters.cvm import CvmSpec
from pydstack.adapters.qemu.user import ensure_user
from pydstack.adapters.supervisor import RunAs

from .busybox_guest import build_image, unavailable
from .conftest import Host

pytestmark = pytest.mark.timeout(180)


def _as(who: RunAs, script: str) -> bool:
    """Whether ``script`` succeeds as ``who`` (with exactly QEMU's ids and groups)."""
    r = subprocess.run(["/bin/sh", "-c", script], capture_output=True, cwd="/", user=who.uid,
                       group=who.gid, extra_groups=list(who.groups))  # fmt: skip
    return r.returncode == 0


def _owner_mode(p: Path) -> tuple[int, int, int]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


def _ids(pid: int) -> dict[str, list[int]]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(x) for x in value.split()]
    return out


async def test_qemu_runs_as_its_user_and_reaches_only_its_files(host: Host, tmp_path: Path) -> None:
    """The QEMU process has QEMU's uid, gid and groups only (no root group); it owns its
    disks, logs and run/ (QMP works there), reads its share, and can neither write the work dir
    nor read the keys beside it (a data dir's identities, 0600 in 0700)."""
    if os.geteuid() != 0 or shutil.which("setfacl") is None:
        pytest.skip("needs root and setfacl (acl) to run QEMU as its own user; this host has both")
    if (why := unavailable()) is not None:
        pytest.skip(f"this host cannot boot a busybox guest: {why}")
    images = build_image(tmp_path / "images", "idle", "echo idle-ready; sleep 600",
                               net=False)  # fmt: skip
    keys = tmp_path / "identities"
    keys.mkdir(mode=0o700)
    (keys / "admin.nk").write_text("SUAAAA-not-a-real-seed")
    (keys / "admin.nk").chmod(0o600)
    backend = await host.start(images)
    await backend.create(CvmSpec(vm_id="vm1", image="idle", vcpu=1, memory_mb=256,
                                 shared_files={"sys-config.json": b"{}"}))  # fmt: skip
    st = await backend.start("vm1")
    assert st.pid is not None and st.state == "running", st
    who = ensure_user()
    ids = _ids(st.pid)
    assert ids["Uid"] == [who.uid] * 4 and ids["Gid"] == [who.gid] * 4, ids
    assert sorted(ids["Groups"]) == sorted(who.groups), ids  # none of root's

    wd = host.root / "vms" / "vm1"
    assert _owner_mode(wd) == (0, who.gid, 0o750)
    assert _owner_mode(wd / "run") == (who.uid, who.gid, 0o700)
    for name in ("disk.qcow2", "data.qcow2", "serial.log", "events.log"):
        assert _owner_mode(wd / name) == (who.uid, who.gid, 0o600), name
    assert _owner_mode(wd / "shared" / "sys-config.json") == (0, who.gid, 0o640)
    for _ in range(200):
        if "idle-ready" in (wd / "serial.log").read_text(errors="replace"):
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("the guest never wrote to its serial log")
    assert _owner_mode(wd / "run" / "qmp.sock")[0] == who.uid

    assert _as(who, f"test -r {wd}/disk.qcow2 -a -w {wd}/data.qcow2")
    assert _as(who, f"cat {wd}/shared/sys-config.json")
    assert not _as(who, f"touch {wd}/planted")  # the work dir stays the VMM's
    assert not _as(who, f"ln -s /etc/shadow {wd}/qemu.stdout.log.new")
    assert not _as(who, f"echo x >> {wd}/manifest.json")
    assert not _as(who, f"cat {keys}/admin.nk")
    assert not _as(who, f"ls {keys}")

    stopped = await backend.stop("vm1", timeout_s=1)  # over QMP in run/: power button, quit
    assert stopped.state == "stopped" and "host-qmp" in stopped.reason, stopped
