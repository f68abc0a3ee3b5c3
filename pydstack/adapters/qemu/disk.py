"""VM disks with ``qemu-img``: create (optionally on a backing image), inspect, grow.

A disk only grows: shrinking would cut the guest's filesystem, so ``resize`` refuses it with
``DiskError`` before touching anything (dstack's UpdateVm has the same rule).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import msgspec

GIB = 1024**3


class DiskError(Exception):
    """A disk operation was refused or failed; one line saying what to do."""


class DiskInfo(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    format: str
    virtual_size: int  # bytes the guest sees
    actual_size: int = 0  # bytes used on the host
    backing: str = ""


async def _qemu_img(*args: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except FileNotFoundError:
        raise DiskError("qemu-img not found: install qemu-utils (make sysdeps)") from None
    out, err = await proc.communicate()
    if proc.returncode != 0:
        msg = err.decode(errors="replace").strip().splitlines()
        raise DiskError(f"qemu-img {args[0]}: {msg[-1] if msg else f'exit {proc.returncode}'}")
    return out.decode()


async def info(path: Path) -> DiskInfo:
    """What ``qemu-img info`` says (``-U``: also while a running VM holds the image)."""
    if not await asyncio.to_thread(os.path.exists, path):
        raise DiskError(f"{path}: no such disk image")
    raw = json.loads(await _qemu_img("info", "-U", "--output=json", str(path)))
    return DiskInfo(
        path=str(path),
        format=str(raw["format"]),
        virtual_size=int(raw["virtual-size"]),
        actual_size=int(raw.get("actual-size", 0)),
        backing=str(raw.get("full-backing-filename") or raw.get("backing-filename") or ""),
    )


async def create(path: Path, size_bytes: int, *, backing: Path | None = None) -> DiskInfo:
    """Create a qcow2 of ``size_bytes`` (at least the backing image's size when given).

    Refuses to overwrite: an existing disk holds a VM's data.
    """
    if await asyncio.to_thread(os.path.exists, path):
        raise DiskError(f"{path} exists already: remove the VM first, or resize it")
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        base = await info(backing)
        size_bytes = max(size_bytes, base.virtual_size)
        args += ["-b", await asyncio.to_thread(os.path.abspath, backing), "-F", base.format]
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    await _qemu_img(*args, str(path), str(size_bytes))
    return await info(path)


async def resize(path: Path, size_bytes: int) -> DiskInfo:
    """Grow the disk to ``size_bytes``; equal is a no-op, smaller raises ``DiskError``."""
    current = await info(path)
    if size_bytes < current.virtual_size:
        raise DiskError(
            f"{path}: refusing to shrink from {current.virtual_size / GIB:g} GiB to "
            f"{size_bytes / GIB:g} GiB (disks only grow; the guest's data would be cut)"
        )
    if size_bytes == current.virtual_size:
        return current
    await _qemu_img("resize", "-q", str(path), str(size_bytes))
    return await info(path)
