"""TDVF metadata parsing, MRTD replay and the TD HOB, on synthetic images built from the spec."""

from __future__ import annotations

import hashlib
import struct

import pytest

from pydstack.core.measure.tdx import MeasureError, mrtd, td_hob, tdvf_sections
from pydstack.core.measure.tdx._tdvf import TdvfSection

from .builders import Section, reference_mrtd, tdvf_image

BFV: Section = (0x1000, 0x4000, 0xFFFFC000, 0x4000, 0, 1)  # measured, from the image
CFV: Section = (0x0, 0x1000, 0xFFFFB000, 0x1000, 1, 0)  # added, not measured
HOB: Section = (0, 0, 0x809000, 0x2000, 2, 0)
TEMP: Section = (0, 0, 0x800000, 0x6000, 3, 0)
AUG: Section = (0, 0, 0x810000, 0x3000, 3, 2)  # PAGE.AUG: not in MRTD at all
SECTIONS = [BFV, CFV, HOB, TEMP, AUG]


def test_sections_are_read_from_the_guided_table() -> None:
    """The parser finds the descriptor behind another GUIDed entry and reads each field."""
    got = tdvf_sections(tdvf_image(SECTIONS))
    assert [tuple(msgspec_fields(s)) for s in got] == SECTIONS


def msgspec_fields(s: TdvfSection) -> tuple[int, ...]:
    return (
        s.data_offset,
        s.raw_data_size,
        s.memory_address,
        s.memory_data_size,
        s.sec_type,
        s.attributes,
    )


@pytest.mark.parametrize("two_pass", [False, True])
def test_mrtd_matches_a_plain_replay(two_pass: bool) -> None:
    """MRTD equals the page-add/extend stream written out independently, in either order."""
    fw = tdvf_image(SECTIONS)
    assert mrtd(fw, two_pass_add_pages=two_pass) == reference_mrtd(fw, SECTIONS, two_pass)


def test_page_order_changes_mrtd() -> None:
    """Single-pass (QEMU 9+) and two-pass (QEMU 8) orders give different MRTDs."""
    fw = tdvf_image(SECTIONS)
    assert mrtd(fw, two_pass_add_pages=True) != mrtd(fw, two_pass_add_pages=False)


def test_a_measured_byte_changes_mrtd_and_an_unmeasured_one_does_not() -> None:
    """Only MR.EXTEND sections' bytes count: flip one in the BFV, then one in the CFV."""
    fw = tdvf_image(SECTIONS)
    base = mrtd(fw, two_pass_add_pages=False)
    in_bfv = bytearray(fw)
    in_bfv[0x1000 + 0x2345] ^= 1
    in_cfv = bytearray(fw)
    in_cfv[0x123] ^= 1
    assert mrtd(bytes(in_bfv), two_pass_add_pages=False) != base
    assert mrtd(bytes(in_cfv), two_pass_add_pages=False) == base


def test_page_aug_sections_are_not_added() -> None:
    """A PAGE.AUG section adds nothing: dropping it leaves MRTD unchanged."""
    with_aug = mrtd(tdvf_image(SECTIONS), two_pass_add_pages=False)
    without = mrtd(tdvf_image([BFV, CFV, HOB, TEMP]), two_pass_add_pages=False)
    assert with_aug == without


def _broken(offset: int, value: bytes) -> bytes:
    fw = bytearray(tdvf_image(SECTIONS))
    fw[offset : offset + len(value)] = value
    return bytes(fw)


@pytest.mark.parametrize(
    ("fw", "message"),
    [
        (bytes(0x10000), "no OVMF GUIDed table footer"),
        (_broken(0x8000, b"TDVX"), "no TDVF signature"),
        (_broken(0x8008, struct.pack("<I", 2)), "version is not 1"),
        # First section's address (offset 8 in the section) off the page grid.
        (_broken(0x8010 + 8, struct.pack("<Q", 0xFFFFC800)), "not page aligned"),
        # First section's raw size bigger than its memory.
        (_broken(0x8010 + 4, struct.pack("<I", 0x5000)), "more raw data than memory"),
        # First section's data offset past the image end.
        (_broken(0x8010, struct.pack("<I", 0xF000)), "past the end of the image"),
        # Footer table length (the u16 before the footer GUID) zero.
        (_broken(0x10000 - 32 - 18, b"\0\0"), "GUIDed table length 0"),
    ],
)
def test_malformed_images_are_refused(fw: bytes, message: str) -> None:
    """Each inconsistency dstack-mr checks for is an error naming it, never a wrong MRTD."""
    with pytest.raises(MeasureError, match=message):
        mrtd(fw, two_pass_add_pages=False)


def test_an_image_without_tdx_metadata_is_refused() -> None:
    """A GUIDed table without the TDX metadata entry is not a TDVF image."""
    fw = bytearray(tdvf_image(SECTIONS))
    guid_at = fw.rindex(b"\x35\x65\x7a\xe4")  # the TDX entry's GUID, first bytes
    fw[guid_at] ^= 0xFF
    # The walk then runs off the table's start, into bytes that are no entry.
    with pytest.raises(MeasureError, match=r"no TDX metadata|entry length"):
        tdvf_sections(bytes(fw))


def _resource(kind: int, start: int, length: int) -> bytes:
    return struct.pack("<HH4x16xIIQQ", 3, 48, kind, 7, start, length)


def _handoff(end_of_list: int) -> bytes:
    return struct.pack("<HH4xI4x32xQ", 1, 56, 9, end_of_list)


def test_td_hob_below_2_75_gib_lists_accepted_and_unaccepted_ranges() -> None:
    """2 GiB: the HOB and temporary-memory ranges accepted (0), everything else unaccepted (7)."""
    sections = tdvf_sections(tdvf_image(SECTIONS))
    body = (
        _resource(7, 0, 0x800000)
        + _resource(0, 0x800000, 0x6000)
        + _resource(7, 0x806000, 0x3000)
        + _resource(0, 0x809000, 0x2000)
        + _resource(7, 0x80B000, 0x5000)
        + _resource(0, 0x810000, 0x3000)
        + _resource(7, 0x813000, (2 << 30) - 0x813000)
    )
    expected = _handoff(0x809000 + 56 + len(body) + 8) + body
    assert td_hob(sections, 2 << 30) == expected


def test_td_hob_from_2_75_gib_puts_the_rest_above_4_gib() -> None:
    """16 GiB: RAM above 2 GiB is described at 4 GiB, as QEMU's q35 maps it."""
    hob = td_hob(tdvf_sections(tdvf_image([BFV, HOB])), 16 << 30)
    body = (
        _resource(7, 0, 0x809000)
        + _resource(0, 0x809000, 0x2000)
        + _resource(7, 0x80B000, 0x80000000 - 0x80B000)
        + _resource(7, 0x100000000, (16 << 30) - 0x80000000)
    )
    assert hob == _handoff(0x809000 + 56 + len(body) + 8) + body


def test_td_hob_digest_depends_on_memory_size() -> None:
    """Two RAM sizes give two TD HOBs (so two RTMR0s)."""
    sections = tdvf_sections(tdvf_image(SECTIONS))
    a = hashlib.sha384(td_hob(sections, 2 << 30)).digest()
    b = hashlib.sha384(td_hob(sections, 4 << 30)).digest()
    assert a != b
