"""RTMR1 and RTMR2: the kernel as QEMU hands it to OVMF, its command line and initrd. Pure.

With ``-kernel``, QEMU rewrites a few fields of the bzImage setup header (loader type, heap
end, command-line and initrd addresses) before OVMF loads it, and OVMF measures the patched
image's Authenticode hash. So the expected RTMR1 needs the initrd size and the RAM size too.

    log = rtmr1_log(kernel, initrd_size=len(initrd), memory_size=2 << 30)
    rtmr2(cmdline + " initrd=initrd", initrd)
"""

from __future__ import annotations

import hashlib

from ._digest import MeasureError, replay, sha384, u16_at, u32_at, utf16le

ACPI_DATA_SIZE = 0x28000  # what dstack's QEMU keeps below 4 GiB for ACPI data
_MIN_KERNEL_LEN = 0x1000
_PE_SIGNATURE = 0x00004550  # "PE\0\0"
_SECURITY_DIRECTORY = 4
_SEPARATOR = bytes(4)
# EV_EFI_ACTION strings OVMF logs around starting the kernel; their digests are fixed.
CALLING_EFI_APPLICATION = b"Calling EFI Application from Boot Option"
EXIT_BOOT_SERVICES_INVOCATION = b"Exit Boot Services Invocation"
EXIT_BOOT_SERVICES_RETURNED = b"Exit Boot Services Returned with Success"


def authenticode_digest(image: bytes, hash_name: str = "sha384") -> bytes:
    """The PE/COFF Authenticode digest of ``image`` as dstack-mr computes it.

    Headers less the checksum and the certificate-table entry, then the sections by file
    offset, then any data between them and the certificate table; zero padding to 8 bytes
    if the file length is not a multiple of 8. Trailing data counts only when the image
    has a certificate table, as in dstack-mr.
    """
    lfanew = u32_at(image, 0x3C, "DOS header e_lfanew")
    if u32_at(image, lfanew, "PE signature") != _PE_SIGNATURE:
        raise MeasureError("kernel is not a PE image (no PE signature)")
    coff = lfanew + 4
    optional_size = u16_at(image, coff + 16, "COFF optional header size")
    optional = coff + 20
    pe32_plus = u16_at(image, optional, "optional header magic") == 0x20B
    checksum = optional + 64
    cert_dir = optional + (112 if pe32_plus else 96) + 8 * _SECURITY_DIRECTORY
    headers_end = u32_at(image, optional + 60, "SizeOfHeaders")
    if not (checksum + 4 <= cert_dir and cert_dir + 8 <= headers_end <= len(image)):
        raise MeasureError("PE headers are inconsistent (SizeOfHeaders too small or too big)")
    h = hashlib.new(hash_name)
    h.update(image[:checksum])
    h.update(image[checksum + 4 : cert_dir])
    h.update(image[cert_dir + 8 : headers_end])
    hashed = headers_end

    table = optional + optional_size
    sections = []
    for i in range(u16_at(image, coff + 2, "section count")):
        size = u32_at(image, table + 40 * i + 16, "SizeOfRawData")
        start = u32_at(image, table + 40 * i + 20, "PointerToRawData")
        if size:
            sections.append((start, size))
    for start, size in sorted(sections, key=lambda s: s[0]):
        h.update(image[start : start + size])  # a section cut short by EOF counts in full
        hashed += size

    cert_at = u32_at(image, cert_dir, "certificate table address")
    cert_size = u32_at(image, cert_dir + 4, "certificate table size")
    if cert_at and cert_size and len(image) - hashed > cert_size:
        h.update(image[hashed : len(image) - cert_size])
    if len(image) % 8:
        h.update(bytes(8 - len(image) % 8))
    return h.digest()


def patch_kernel(kernel: bytes, initrd_size: int, memory_size: int, acpi_data_size: int) -> bytes:
    """The bzImage after QEMU's ``-kernel`` loader has filled in its setup header."""
    if len(kernel) < _MIN_KERNEL_LEN:
        raise MeasureError("the kernel image is too short")
    if not 0 <= initrd_size < 1 << 32:
        raise MeasureError(f"initrd size {initrd_size} is not a 32-bit size")
    kd = bytearray(kernel)
    protocol = u16_at(kernel, 0x206, "boot protocol version")
    # Old kernels and those not loaded high keep the real-mode code at 0x90000.
    if protocol < 0x200 or not kd[0x211] & 0x01:
        real_addr, cmdline_addr = 0x90000, 0x9A000
    else:
        real_addr, cmdline_addr = 0x10000, 0x20000
    if protocol >= 0x200:
        kd[0x210] = 0xB0  # type_of_loader: QEMU
    if protocol >= 0x201:
        kd[0x211] |= 0x80  # CAN_USE_HEAP
        heap_end = max(cmdline_addr - real_addr - 0x200, 0)
        kd[0x224:0x228] = heap_end.to_bytes(4, "little")
    if protocol >= 0x202:
        kd[0x228:0x22C] = cmdline_addr.to_bytes(4, "little")
    else:
        kd[0x20:0x22] = (0xA33F).to_bytes(2, "little")
        kd[0x22:0x24] = ((cmdline_addr - real_addr) & 0xFFFF).to_bytes(2, "little")
    if initrd_size > 0:
        if protocol < 0x200:
            raise MeasureError("the kernel image is too old for an initrd")
        initrd_max = _initrd_max(kernel, protocol)
        lowmem = 0xB0000000 if memory_size < 0xB0000000 else 0x80000000
        below_4g = (lowmem if memory_size >= lowmem else memory_size) & 0xFFFFFFFF
        if acpi_data_size > below_4g:
            raise MeasureError(f"ACPI data ({acpi_data_size}) exceeds low memory ({below_4g})")
        available = below_4g - acpi_data_size
        if initrd_max >= available:
            initrd_max = max(available - 1, 0)
        if initrd_size >= initrd_max:
            raise MeasureError("initrd is too large")
        initrd_addr = (initrd_max - initrd_size) & ~4095
        kd[0x218:0x21C] = initrd_addr.to_bytes(4, "little")
        kd[0x21C:0x220] = initrd_size.to_bytes(4, "little")
    return bytes(kd)


def _initrd_max(kernel: bytes, protocol: int) -> int:
    if protocol >= 0x20C:
        # dstack-mr tests xloadflags bit 6 (5-level paging enabled) where QEMU tests bit 1
        # (can be loaded above 4G) and then reads initrd_addr_max. Kernels built with 5-level
        # paging set both bits, and then both give the same address; we follow dstack-mr.
        return 0xFFFFFFFF if u16_at(kernel, 0x236, "xloadflags") & 0x40 else 0x37FFFFFF
    if protocol >= 0x203:
        return u32_at(kernel, 0x22C, "initrd_addr_max") or 0x37FFFFFF
    return 0x37FFFFFF


def rtmr1_log(
    kernel: bytes, initrd_size: int, memory_size: int, acpi_data_size: int = ACPI_DATA_SIZE
) -> tuple[bytes, ...]:
    """The RTMR1 event digests: the patched kernel, then OVMF's fixed boot events."""
    patched = patch_kernel(kernel, initrd_size, memory_size, acpi_data_size)
    return (
        authenticode_digest(patched),
        sha384(CALLING_EFI_APPLICATION),
        sha384(_SEPARATOR),
        sha384(EXIT_BOOT_SERVICES_INVOCATION),
        sha384(EXIT_BOOT_SERVICES_RETURNED),
    )


def rtmr1(
    kernel: bytes, initrd_size: int, memory_size: int, acpi_data_size: int = ACPI_DATA_SIZE
) -> bytes:
    return replay(rtmr1_log(kernel, initrd_size, memory_size, acpi_data_size))


def cmdline_digest(cmdline: str) -> bytes:
    # OVMF measures the LoadOptions it passes: UTF-16LE with the terminating NUL.
    return sha384(utf16le(cmdline) + b"\0\0")


def rtmr2_log(cmdline: str, initrd: bytes) -> tuple[bytes, ...]:
    """The RTMR2 event digests. dstack's ``cmdline`` already ends in `` initrd=initrd``."""
    return (cmdline_digest(cmdline), sha384(initrd))


def rtmr2(cmdline: str, initrd: bytes) -> bytes:
    return replay(rtmr2_log(cmdline, initrd))
