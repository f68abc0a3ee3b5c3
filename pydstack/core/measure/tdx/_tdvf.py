"""TDVF (TDX OVMF) metadata, the MRTD it yields, and the TD HOB that OVMF measures. Pure.

The firmware image ends with OVMF's GUIDed table (read backwards from the footer GUID 32 bytes
before the end); one entry points at the TDVF descriptor, whose sections say which pages the
VMM adds to the TD (TDH.MEM.PAGE.ADD) and which it also measures (TDH.MR.EXTEND, 256 bytes at a
time). The TDX module folds both into MRTD, so replaying them gives MRTD without hardware.

    sections = tdvf_sections(firmware)
    mr = mrtd(firmware, two_pass_add_pages=False)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import msgspec

from ._digest import MeasureError, guid_le, sha384, u16_at, u32_at, u64_at

PAGE_SIZE = 0x1000
MR_EXTEND_GRANULARITY = 0x100
ATTRIBUTE_MR_EXTEND = 0x1
ATTRIBUTE_PAGE_AUG = 0x2  # added later by TDH.MEM.PAGE.AUG, so not in MRTD
SECTION_BFV, SECTION_CFV, SECTION_TD_HOB, SECTION_TEMP_MEM = 0, 1, 2, 3

TABLE_FOOTER_GUID = guid_le("96b582de-1fb2-45f7-baea-a366c55a082d")
TDX_METADATA_OFFSET_GUID = guid_le("e47a6535-984a-4798-865e-4685a7bf8ec2")
_BYTES_AFTER_FOOTER = 32  # the reset vector and padding that follow the table
_ENTRY_TAIL = 18  # each table entry ends with a u16 length and its GUID
_DEFAULT_TD_HOB_BASE = 0x809000  # where OVMF puts the HOB when no section says


class TdvfSection(msgspec.Struct, frozen=True, kw_only=True):
    """One TDX metadata section (TDVF spec, table 3-3)."""

    data_offset: int
    raw_data_size: int
    memory_address: int
    memory_data_size: int
    sec_type: int
    attributes: int


def _metadata_offset(fw: bytes) -> int:
    """The TDVF descriptor's offset from the end, found through the GUIDed table."""
    end = len(fw) - _BYTES_AFTER_FOOTER
    if end < _ENTRY_TAIL or fw[end - 16 : end] != TABLE_FOOTER_GUID:
        raise MeasureError("not a TDVF image: no OVMF GUIDed table footer")
    tables_len = u16_at(fw, end - _ENTRY_TAIL, "GUIDed table length")
    if tables_len == 0 or tables_len > end - _ENTRY_TAIL:
        raise MeasureError(f"GUIDed table length {tables_len} does not fit the image")
    tables = fw[end - _ENTRY_TAIL - tables_len : end - _ENTRY_TAIL]
    pos = len(tables)
    while pos >= _ENTRY_TAIL:
        entry_len = u16_at(tables, pos - _ENTRY_TAIL, "GUIDed table entry length")
        # A zero or short length would walk in place forever; dstack-mr has no such check,
        # but no real table has one.
        if entry_len < _ENTRY_TAIL or entry_len > pos:
            raise MeasureError(f"GUIDed table entry length {entry_len} is invalid")
        if tables[pos - 16 : pos] == TDX_METADATA_OFFSET_GUID:
            if entry_len < _ENTRY_TAIL + 4:
                raise MeasureError("TDX metadata offset entry has no offset")
            return u32_at(tables, pos - _ENTRY_TAIL - 4, "TDX metadata offset")
        pos -= entry_len
    raise MeasureError("not a TDVF image: no TDX metadata in the GUIDed table")


def tdvf_sections(firmware: bytes) -> tuple[TdvfSection, ...]:
    """The TDX metadata sections of an OVMF image, checked as dstack-mr checks them."""
    back = _metadata_offset(firmware)
    if back > len(firmware):
        raise MeasureError("TDX metadata offset is past the start of the image")
    base = len(firmware) - back
    if firmware[base : base + 4] != b"TDVF":
        raise MeasureError("TDX metadata has no TDVF signature")
    if u32_at(firmware, base + 8, "TDVF version") != 1:
        raise MeasureError("TDVF descriptor version is not 1")
    count = u32_at(firmware, base + 12, "TDVF section count")
    sections = []
    for i in range(count):
        at = base + 16 + 32 * i
        s = TdvfSection(
            data_offset=u32_at(firmware, at, "section data offset"),
            raw_data_size=u32_at(firmware, at + 4, "section raw size"),
            memory_address=u64_at(firmware, at + 8, "section address"),
            memory_data_size=u64_at(firmware, at + 16, "section memory size"),
            sec_type=u32_at(firmware, at + 24, "section type"),
            attributes=u32_at(firmware, at + 28, "section attributes"),
        )
        if s.memory_address % PAGE_SIZE or s.memory_data_size % PAGE_SIZE:
            raise MeasureError(f"TDVF section {i} is not page aligned")
        if s.memory_data_size < s.raw_data_size:
            raise MeasureError(f"TDVF section {i} holds more raw data than memory")
        if s.attributes & ATTRIBUTE_MR_EXTEND and s.data_offset + s.memory_data_size > len(
            firmware
        ):
            # Extended pages are read from the image over the whole memory size.
            raise MeasureError(f"TDVF section {i} extends past the end of the image")
        sections.append(s)
    return tuple(sections)


def mrtd(firmware: bytes, *, two_pass_add_pages: bool) -> bytes:
    """MRTD of a TD booted from ``firmware`` (48 bytes).

    QEMU 8.x added all of a section's pages before measuring any (``two_pass_add_pages``);
    later QEMUs add and measure page by page. The order changes the digest.
    """
    h = hashlib.sha384()

    def page_add(s: TdvfSection, page: int) -> None:
        if not s.attributes & ATTRIBUTE_PAGE_AUG:
            gpa = s.memory_address + page * PAGE_SIZE
            h.update(_command(b"MEM.PAGE.ADD", gpa))

    def extend(s: TdvfSection, page: int) -> None:
        if s.attributes & ATTRIBUTE_MR_EXTEND:
            for off in range(page * PAGE_SIZE, (page + 1) * PAGE_SIZE, MR_EXTEND_GRANULARITY):
                h.update(_command(b"MR.EXTEND", s.memory_address + off))
                start = s.data_offset + off
                h.update(firmware[start : start + MR_EXTEND_GRANULARITY])

    passes: tuple[tuple[Callable[[TdvfSection, int], None], ...], ...]
    passes = ((page_add,), (extend,)) if two_pass_add_pages else ((page_add, extend),)
    for s in tdvf_sections(firmware):
        pages = range(s.memory_data_size // PAGE_SIZE)
        for steps in passes:
            for page in pages:
                for step in steps:
                    step(s, page)
    return h.digest()


def _command(name: bytes, gpa: int) -> bytes:
    # The 128-byte buffer the TDX module hashes: the ASCII operation, then the GPA at 16.
    return name.ljust(16, b"\0") + gpa.to_bytes(8, "little") + bytes(104)


def _accept(
    ranges: list[tuple[bool, int, int]], start: int, end: int
) -> list[tuple[bool, int, int]]:
    """Mark [start, end) accepted, splitting the unaccepted ranges it overlaps."""
    if start >= end:
        return ranges
    out = []
    for accepted, lo, hi in ranges:
        if accepted or hi <= start or lo >= end:
            out.append((accepted, lo, hi))
            continue
        if lo < start:
            out.append((False, lo, start))
        if hi > end:
            out.append((False, end, hi))
    out.append((True, start, end))
    return sorted(out, key=lambda r: r[1])


def _resource_hob(resource_type: int, start: int, length: int) -> bytes:
    # EFI_HOB_RESOURCE_DESCRIPTOR: header (type 3, length 48), zero owner GUID, the type,
    # attributes PRESENT|INITIALIZED|TESTED (7), start and length.
    return (
        b"\x03\x00\x30\x00"
        + bytes(4 + 16)
        + resource_type.to_bytes(4, "little")
        + (7).to_bytes(4, "little")
        + start.to_bytes(8, "little")
        + length.to_bytes(8, "little")
    )


def td_hob(sections: tuple[TdvfSection, ...], memory_size: int) -> bytes:
    """The TD HOB list OVMF measures first into RTMR0 (without its end-of-list HOB).

    The accepted ranges are the HOB and temporary-memory sections; the rest of RAM is
    unaccepted (type 7). With 2.75 GiB or more, QEMU puts RAM above 2 GiB at 4 GiB.
    """
    ranges = [(False, 0, memory_size)]
    base = _DEFAULT_TD_HOB_BASE
    for s in sections:
        if s.sec_type in (SECTION_TD_HOB, SECTION_TEMP_MEM):
            ranges = _accept(ranges, s.memory_address, s.memory_address + s.memory_data_size)
        if s.sec_type == SECTION_TD_HOB:
            base = s.memory_address
    *head, (_, last_start, last_end) = ranges
    body = b"".join(_resource_hob(0 if ok else 7, lo, hi - lo) for ok, lo, hi in head)
    # The last range (the top of RAM) is written as unaccepted whatever it is, as dstack-mr
    # writes it; the other ranges say whether a section accepted them.
    if memory_size >= 0xB0000000:
        if last_start < 0x80000000:
            body += _resource_hob(7, last_start, 0x80000000 - last_start)
        if last_end > 0x80000000:
            body += _resource_hob(7, 0x100000000, last_end - 0x80000000)
    else:
        body += _resource_hob(7, last_start, last_end - last_start)
    header_len = 56
    end_of_list = base + header_len + len(body) + 8  # the 8-byte end HOB follows
    # EFI_HOB_HANDOFF_INFO_TABLE: type 1, length 56, version 9, all memory fields zero
    # but EfiEndOfHobList.
    header = (
        b"\x01\x00\x38\x00"
        + bytes(4)
        + (9).to_bytes(4, "little")
        + bytes(4 + 8 * 4)
        + end_of_list.to_bytes(8, "little")
    )
    return header + body


def td_hob_digest(firmware: bytes, memory_size: int) -> bytes:
    return sha384(td_hob(tdvf_sections(firmware), memory_size))
