"""QemuBackend without booting: work dir, disks, host share, command line, adopt-list.

The image here is tiny but real (a qcow2 hda made by qemu-img); the supervisor is a real
process. What needs a running guest is in ``tests/vmm/test_qemu.py``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from pathlib import Path

import pytest

from pydstack.adapters.cvm import CvmError, CvmNotFound, CvmSpec
from pydstack.adapters.qemu import QemuBackendConfig, build_argv, disk
from pydstack.adapters.qemu.backend import DATA_DISK_GB, QemuBackend
from pydstack.adapters.qemu.disk import GIB
from pydstack.core.events import PortMap

from .conftest import Host

COMPOSE = b'{"manifest_version":2,"name":"t"}'


@pytest.fixture
async def images(tmp_path: Path) -> Path:
    d = tmp_path / "images" / "tiny"
    d.mkdir(parents=True)
    (d / "bzImage").write_bytes(b"k")
    (d / "initramfs.cpio.gz").write_bytes(b"i")
    await disk.create(d / "rootfs.qcow2", 1 * GIB)
    meta = {"kernel": "bzImage", "initrd": "initramfs.cpio.gz", "hda": "rootfs.qcow2",
            "cmdline": "console=ttyS0", "shared_ro": True}  # fmt: skip
    (d / "metadata.json").write_text(json.dumps(meta))
    return d.parent


def spec(**kw: object) -> CvmSpec:
    base: dict[str, object] = {
        "vm_id": "vm1", "image": "tiny", "vcpu": 1, "memory_mb": 256, "cid": 2001,
        "ports": (PortMap(host_port=18081, vm_port=80),), "app_compose": COMPOSE,
        "shared_files": {"sys-config.json": b"{}"},
    }  # fmt: skip
    base.update(kw)
    return CvmSpec(**base)  # type: ignore[arg-type]


async def test_create_prepares_work_dir_disk_and_share(host: Host, images: Path) -> None:
    backend = await host.start(images)
    st = await backend.create(spec(disk_gb=2))
    assert (st.state, st.cid, st.pid) == ("created", 2001, None)
    wd = host.root / "vms" / "vm1"
    assert (wd / "shared" / "app-compose.json").read_bytes() == COMPOSE
    assert (wd / "shared" / "sys-config.json").read_bytes() == b"{}"
    d = await disk.info(wd / "disk.qcow2")
    assert d.virtual_size == 2 * GIB and d.backing == str(images / "tiny" / "rootfs.qcow2")
    # The data disk (the guest makes it LUKS2): empty, no backing file, the requested size.
    data = await disk.info(wd / "data.qcow2")
    assert (data.virtual_size, data.backing) == (2 * GIB, "")
    # Updating the manifest grows the disks, never shrinks them.
    await backend.create(spec(disk_gb=3))
    assert (await disk.info(wd / "disk.qcow2")).virtual_size == 3 * GIB
    assert (await disk.info(wd / "data.qcow2")).virtual_size == 3 * GIB
    with pytest.raises(CvmError, match="refusing to shrink"):
        await backend.create(spec(disk_gb=1))
    with pytest.raises(CvmError, match="plain file name"):
        await backend.create(spec(shared_files={"../evil": b""}))
    with pytest.raises(CvmError, match="image 'nope'"):
        await backend.create(spec(vm_id="vm2", image="nope"))


async def test_command_line_for_tcg_and_tdx_hosts(host: Host, images: Path) -> None:
    """TCG here (CID reserved, no vsock device); TDX elsewhere: vsock + mrconfigid of compose."""
    backend = await host.start(images)
    await backend.create(spec())
    wd = host.root / "vms" / "vm1"
    tcg = build_argv(backend.qemu_spec(spec()))
    assert "hostfwd=tcp:127.0.0.1:18081-:80" in " ".join(tcg)
    assert f"file={wd}/data.qcow2,if=none,id=hd2,format=qcow2" in tcg
    assert "virtio-blk-pci,drive=hd2,serial=pydstack-data" in tcg
    assert (await disk.info(wd / "data.qcow2")).virtual_size == DATA_DISK_GB * GIB
    assert not any("guest-cid" in a for a in tcg)
    assert f"local,path={wd}/shared,mount_tag=host-shared,readonly=on" in " ".join(tcg)
    tdx_cfg = QemuBackendConfig(vms_dir=host.root / "vms", images=images, platform="tdx")
    assert host.client is not None
    tdx = build_argv(QemuBackend(tdx_cfg, host.client).qemu_spec(spec()))
    assert "vhost-vsock-pci,guest-cid=2001" in tdx
    obj = tdx[tdx.index("-object") + 1]
    mrconfigid = base64.b64decode(json.loads(obj)["mrconfigid"])
    assert mrconfigid[1:33] == hashlib.sha256(COMPOSE).digest()


async def test_unknown_and_invalid_vms_are_refused(host: Host, images: Path) -> None:
    backend = await host.start(images)
    with pytest.raises(CvmNotFound):
        await backend.status("ghost")
    with pytest.raises(CvmNotFound):
        await backend.remove("ghost")
    with pytest.raises(CvmError, match="vm_id"):
        await backend.create(spec(vm_id="../x"))


async def test_an_exited_vm_keeps_its_cid_until_removed(host: Host, images: Path) -> None:
    """QEMU refuses the fake kernel and exits; the CVM is 'exited', its CID still reserved."""
    backend = await host.start(images)
    await backend.create(spec())
    st = await backend.start("vm1")
    assert st.pid is not None
    for _ in range(100):
        if (st := await backend.status("vm1")).state == "exited":
            break
        await asyncio.sleep(0.1)
    assert st.state == "exited" and st.exit_code == 1, st
    listed = await backend.list()
    assert [(s.vm_id, s.cid) for s in listed] == [("vm1", 2001)]
    await backend.create(spec(vm_id="vm2", cid=2001))
    with pytest.raises(CvmError, match="cid 2001 is held by process 'vm1'"):
        await backend.start("vm2")  # the stopped vm1 still owns it (dstack #996)
    await backend.remove("vm1")
    assert (await backend.start("vm2")).pid is not None
