"""RTMR1/RTMR2 pieces: the Authenticode walk, QEMU's setup-header patch, the command line."""

from __future__ import annotations

import hashlib
import struct

import pytest

from pydstack.core.measure.tdx import (
    MeasureError,
    authenticode_digest,
    cmdline_digest,
    patch_kernel,
    rtmr2_log,
)

from .builders import pattern, pe_image, reference_authenticode

A, B = pattern(0x600, b"a"), pattern(0x400, b"b")


def test_sections_are_hashed_in_file_order() -> None:
    """Section table order does not matter: sections are hashed sorted by file offset."""
    img = pe_image([(B, 0xA00), (A, 0x400), (b"", 0)])
    assert authenticode_digest(img) == reference_authenticode(img)


def test_certificate_and_checksum_are_excluded_and_trailing_data_counts() -> None:
    """With a certificate table: data after the sections counts; checksum and table do not."""
    img = bytearray(pe_image([(A, 0x400)], cert=pattern(0x80, b"cert"), trailer=b"tail" * 3))
    digest = authenticode_digest(bytes(img))
    assert digest == reference_authenticode(bytes(img))
    lfanew = struct.unpack_from("<I", img, 0x3C)[0]
    struct.pack_into("<I", img, lfanew + 24 + 64, 0x12345678)  # checksum
    img[-1] ^= 0xFF  # inside the certificate
    assert authenticode_digest(bytes(img)) == digest
    img[0x400 + 0x600 + 1] ^= 0xFF  # inside the trailing data
    assert authenticode_digest(bytes(img)) != digest


def test_without_a_certificate_table_trailing_data_is_ignored() -> None:
    """dstack-mr hashes data after the sections only when a certificate table exists."""
    plain = pe_image([(A, 0x400)])
    trailed = pe_image([(A, 0x400)], trailer=b"12345678")
    assert authenticode_digest(plain) == authenticode_digest(trailed)


def test_odd_length_is_zero_padded_to_8_bytes() -> None:
    """A length not a multiple of 8 hashes zero padding: 3 bytes of trailer give 5 zeros."""
    img = pe_image([(A, 0x400)], cert=b"c" * 8, trailer=b"xyz")
    assert len(img) % 8 == 3
    assert authenticode_digest(img) == reference_authenticode(img)


def test_a_section_byte_changes_the_digest() -> None:
    img = bytearray(pe_image([(A, 0x400), (B, 0xA00)]))
    before = authenticode_digest(bytes(img))
    img[0xA10] ^= 1
    assert authenticode_digest(bytes(img)) != before


def test_not_a_pe_image_is_refused() -> None:
    img = bytearray(pe_image([(A, 0x400)]))
    img[0x40:0x44] = b"NE\0\0"
    with pytest.raises(MeasureError, match="PE signature"):
        authenticode_digest(bytes(img))


def _setup(img: bytes) -> dict[str, int]:
    def u16(at: int) -> int:
        return int(struct.unpack_from("<H", img, at)[0])

    def u32(at: int) -> int:
        return int(struct.unpack_from("<I", img, at)[0])

    return {
        "loader": img[0x210],
        "loadflags": img[0x211],
        "heap_end": u32(0x224),
        "cmdline": u32(0x228),
        "initrd_addr": u32(0x218),
        "initrd_size": u32(0x21C),
        "old_magic": u16(0x20),
        "old_offset": u16(0x22),
    }


def _kernel(protocol: int = 0x20F, loadflags: int = 0x01, xloadflags: int = 0x7F) -> bytes:
    return pe_image(
        [(A, 0x400), (pattern(0x1000, b"k"), 0xA00)],
        protocol=protocol,
        loadflags=loadflags,
        xloadflags=xloadflags,
    )


def test_modern_kernel_gets_qemus_loader_fields_and_initrd_below_acpi_data() -> None:
    """Protocol 2.15, loaded high, 5-level bit: initrd ends under 2 GiB less ACPI data."""
    k = _kernel(protocol=0x20F, loadflags=0x01, xloadflags=0x7F)
    got = _setup(patch_kernel(k, 0x123456, 2 << 30, 0x28000))
    top = 0x80000000 - 0x28000 - 1
    assert got | {"old_magic": 0, "old_offset": 0} == {
        "loader": 0xB0,
        "loadflags": 0x81,
        "heap_end": 0x20000 - 0x10000 - 0x200,
        "cmdline": 0x20000,
        "initrd_addr": (top - 0x123456) & ~0xFFF,
        "initrd_size": 0x123456,
        "old_magic": 0,
        "old_offset": 0,
    }


def test_without_xloadflags_bit_6_the_initrd_stays_under_896_mib() -> None:
    """dstack-mr's rule: protocol >= 2.12 without bit 6 caps the initrd at 0x37ffffff."""
    k = _kernel(protocol=0x20F, xloadflags=0x03)
    got = _setup(patch_kernel(k, 0x1000, 2 << 30, 0x28000))
    assert got["initrd_addr"] == (0x37FFFFFF - 0x1000) & ~0xFFF


def test_protocol_2_03_reads_initrd_addr_max_and_large_ram_caps_low_memory_at_2_gib() -> None:
    """initrd_addr_max (0x7fffffff here) applies, then 4 GiB of RAM leaves 2 GiB below 4G."""
    k = _kernel(protocol=0x203)
    got = _setup(patch_kernel(k, 0x1000, 4 << 30, 0x28000))
    assert got["initrd_addr"] == (0x80000000 - 0x28000 - 1 - 0x1000) & ~0xFFF


def test_old_protocol_uses_the_legacy_command_line_fields() -> None:
    """Before 2.02 the command line is given as magic 0xa33f and an offset from 0x90000."""
    k = _kernel(protocol=0x201, loadflags=0x00)
    got = _setup(patch_kernel(k, 0, 1 << 30, 0x28000))
    assert (got["old_magic"], got["old_offset"], got["heap_end"]) == (0xA33F, 0xA000, 0x9E00)
    assert got["initrd_size"] == struct.unpack_from("<I", k, 0x21C)[0]  # untouched: no initrd


def test_patching_changes_only_setup_header_bytes() -> None:
    """Everything outside the fields QEMU writes is left as it was."""
    k = _kernel()
    patched = patch_kernel(k, 0x1000, 2 << 30, 0x28000)
    changed = {i for i, (x, y) in enumerate(zip(k, patched, strict=True)) if x != y}
    assert changed and changed <= set(range(0x210, 0x22C))


@pytest.mark.parametrize(
    ("kernel", "initrd", "memory", "message"),
    [
        (b"\0" * 0x800, 0, 1 << 30, "too short"),
        (_kernel(protocol=0x1FF), 10, 1 << 30, "too old"),
        (_kernel(), 0x40000000, 1 << 30, "initrd is too large"),
        (_kernel(), 1, 0x20000, "ACPI data"),
    ],
)
def test_unloadable_kernels_are_refused(
    kernel: bytes, initrd: int, memory: int, message: str
) -> None:
    with pytest.raises(MeasureError, match=message):
        patch_kernel(kernel, initrd, memory, 0x28000)


def test_command_line_is_utf16le_with_its_nul() -> None:
    """The cmdline digest covers UTF-16LE code units (surrogates for astral) and a NUL."""
    text = "console=ttyS0 é \U0001f600"
    units = [ord(c) for c in "console=ttyS0 é "] + [0xD83D, 0xDE00, 0]
    raw = b"".join(struct.pack("<H", u) for u in units)
    assert cmdline_digest(text) == hashlib.sha384(raw).digest()
    assert rtmr2_log(text, b"initrd") == (
        hashlib.sha384(raw).digest(),
        hashlib.sha384(b"initrd").digest(),
    )
