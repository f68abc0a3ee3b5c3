"""The simulator's measurement rule: MRTD and RTMR0-2 from an image's parts and the VM shape.

Hosts without TDX run simulated TDs. For the KMS's image check to mean the same thing there as
on TDX, a simulated TD is measured from what it boots, shaped like TDVF's log: MRTD from the
firmware alone; RTMR0 the firmware's configuration and the tables that depend on the shape
(TD HOB, ACPI: vCPUs, memory, devices); RTMR1 the kernel (whose patched setup header depends on
the memory size, as in dstack-mr); RTMR2 the command line and the initrd. Different images or
shapes give different values; the same ones always the same.

An image's parts are the sha384 digests of its files (``ImageParts``), so the KMS needs no
image file to recompute them. This is a rule of our simulator, not Intel's: a simulated
platform proves nothing against its own host (whoever holds the dev PKI can sign any quote).

    m = simulated_measurements(parts, VmShape(cpu_count=2, memory_size=2 << 30))
"""

from __future__ import annotations

import hashlib
import struct

import msgspec

from .shape import VmShape

EV_SEPARATOR = 0x00000004
EV_IPL = 0x0000000D
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_HANDOFF_TABLES2 = 0x8000000B
EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
_SEPARATOR = hashlib.sha384(bytes(4)).digest()


class ImageParts(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """sha384 (hex) of an image's firmware, kernel and initrd, and its kernel command line."""

    firmware: str
    kernel: str
    initrd: str
    cmdline: str = ""

    def problem(self) -> str | None:
        for name in ("firmware", "kernel", "initrd"):
            value = getattr(self, name)
            if len(value) != 96 or any(c not in "0123456789abcdef" for c in value):
                return f"{name} digest {value[:16]!r} is not 96 lowercase hex digits (sha384)"
        if len(self.cmdline) > 4096:
            return "cmdline is over 4096 characters"
        return None


class BootEntry(msgspec.Struct, frozen=True):
    """One boot-time event: what the (simulated) firmware extends into an RTMR."""

    imr: int
    event_type: int
    name: str
    digest: bytes
    payload: bytes


class Measured(msgspec.Struct, frozen=True):
    mr_td: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes


def _shape_bytes(s: VmShape) -> bytes:
    return struct.pack(
        "<IQ??II", s.cpu_count, s.memory_size, s.hugepages, s.hotplug_off, s.num_gpus,
        s.num_nvswitches,
    )  # fmt: skip


def simulated_mr_td(parts: ImageParts) -> bytes:
    """MRTD depends on the firmware only (as TDX's: the pages TDVF's metadata adds)."""
    return hashlib.sha384(b"pydstack simulated MRTD\x00" + bytes.fromhex(parts.firmware)).digest()


def simulated_boot_log(parts: ImageParts, shape: VmShape) -> list[BootEntry]:
    fw, shaped = bytes.fromhex(parts.firmware), _shape_bytes(shape)
    # dstack-mr patches the kernel's setup header with the memory size before hashing it
    kernel = b"kernel\x00" + bytes.fromhex(parts.kernel) + struct.pack("<Q", shape.memory_size)

    def entry(imr: int, etype: int, name: str, data: bytes, payload: bytes) -> BootEntry:
        return BootEntry(imr, etype, name, hashlib.sha384(data).digest(), payload)

    def separator(imr: int) -> BootEntry:
        return BootEntry(imr, EV_SEPARATOR, "separator", _SEPARATOR, bytes(4))

    return [
        entry(0, EV_EFI_HANDOFF_TABLES2, "TdHob", b"td-hob\x00" + fw + shaped, b"TdHob"),
        entry(0, EV_EFI_PLATFORM_FIRMWARE_BLOB2, "CFV", b"cfv\x00" + fw, b"CFV"),
        entry(0, EV_EFI_VARIABLE_DRIVER_CONFIG, "SecureBoot", b"secure-boot\x00", b"\x00"),
        entry(0, EV_EFI_PLATFORM_FIRMWARE_BLOB2, "ACPI DATA", b"acpi\x00" + shaped, b"ACPI"),
        separator(0),
        entry(1, EV_EFI_BOOT_SERVICES_APPLICATION, "kernel", kernel, b"kernel"),
        separator(1),
        entry(2, EV_IPL, "cmdline", parts.cmdline.encode(), parts.cmdline.encode()[:64]),
        BootEntry(2, EV_IPL, "initrd", bytes.fromhex(parts.initrd), b"initrd"),
    ]


def replay(entries: list[BootEntry]) -> tuple[bytes, bytes, bytes]:
    mrs = [bytes(48)] * 3
    for e in entries:
        mrs[e.imr] = hashlib.sha384(mrs[e.imr] + e.digest).digest()
    return mrs[0], mrs[1], mrs[2]


def simulated_measurements(parts: ImageParts, shape: VmShape) -> Measured:
    r0, r1, r2 = replay(simulated_boot_log(parts, shape))
    return Measured(simulated_mr_td(parts), r0, r1, r2)
