"""qemu-img disks: created on a backing image, grown, never shrunk."""

from __future__ import annotations

from pathlib import Path

import pytest

from pydstack.adapters.qemu import disk
from pydstack.adapters.qemu.disk import GIB, DiskError


async def test_create_then_grow(tmp_path: Path) -> None:
    d = await disk.create(tmp_path / "a.qcow2", 1 * GIB)
    assert (d.format, d.virtual_size, d.backing) == ("qcow2", GIB, "")
    grown = await disk.resize(tmp_path / "a.qcow2", 3 * GIB)
    assert grown.virtual_size == 3 * GIB
    assert (await disk.resize(tmp_path / "a.qcow2", 3 * GIB)).virtual_size == 3 * GIB


async def test_shrink_is_refused_and_leaves_the_disk_alone(tmp_path: Path) -> None:
    await disk.create(tmp_path / "a.qcow2", 2 * GIB)
    with pytest.raises(DiskError, match="refusing to shrink from 2 GiB to 1 GiB"):
        await disk.resize(tmp_path / "a.qcow2", 1 * GIB)
    assert (await disk.info(tmp_path / "a.qcow2")).virtual_size == 2 * GIB


async def test_backed_disk_is_at_least_its_base(tmp_path: Path) -> None:
    """A VM disk on the image's hda: the requested size, but never smaller than the base."""
    base = await disk.create(tmp_path / "base.qcow2", 2 * GIB)
    small = await disk.create(tmp_path / "vm1.qcow2", 1 * GIB, backing=Path(base.path))
    big = await disk.create(tmp_path / "vm2.qcow2", 5 * GIB, backing=Path(base.path))
    assert small.virtual_size == 2 * GIB and big.virtual_size == 5 * GIB
    assert small.backing == str(tmp_path / "base.qcow2")


async def test_existing_disk_is_never_overwritten(tmp_path: Path) -> None:
    await disk.create(tmp_path / "a.qcow2", GIB)
    with pytest.raises(DiskError, match="exists already"):
        await disk.create(tmp_path / "a.qcow2", GIB)
    with pytest.raises(DiskError, match="no such disk image"):
        await disk.info(tmp_path / "missing.qcow2")
