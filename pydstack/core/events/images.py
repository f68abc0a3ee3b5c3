"""Events of a guest image, subject ``dstack.image.<os_image_hash>``. Written by an admin only.

An image on the log is what the KMS measures requests against: the digests of the files that
decide MRTD and RTMR0-2 (the simulator derives its measurements from them) and, for real TDX,
the expected values per VM shape as dstack-mr computes them. ``os_image_hash`` is dstack's:
sha256 of the image's ``sha256sum.txt``, which the event carries so anyone can re-check it.
"""

from __future__ import annotations

import msgspec

from ._base import Event


class ShapeMeasurements(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Expected TDX measurements (hex) of an image for one VM shape (``core.measure.VmShape``
    fields), as dstack-mr computes them."""

    cpu_count: int
    memory_size: int
    hugepages: bool = False
    num_gpus: int = 0
    num_nvswitches: int = 0
    hotplug_off: bool = False
    mr_td: str
    rtmr0: str
    rtmr1: str
    rtmr2: str


class ImageRegistered(Event, tag="ImageRegistered", frozen=True):
    os_image_hash: str  # hex; equals the aggregate id and sha256(sha256sum)
    name: str
    # sha384 (hex) of the files the measurements depend on, and the kernel command line
    firmware: str
    kernel: str
    initrd: str
    cmdline: str = ""
    version: str = ""
    sha256sum: str = ""  # the image's sha256sum.txt, byte for byte
    tdx: tuple[ShapeMeasurements, ...] = ()


class ImageRevoked(Event, tag="ImageRevoked", frozen=True):
    """No key for this image from now on (requests already decided stay on the log)."""

    os_image_hash: str
    reason: str = ""
