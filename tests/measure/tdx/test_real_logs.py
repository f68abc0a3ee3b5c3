"""Our fixed RTMR0/RTMR1 events against the boot logs of two real dstack TDs.

``tests/vectors/dstack``: ``quote-report.json`` (dstack's verifier fixture, the pre-202505
OVMF: 13 RTMR0 events) and ``attestation.bin`` decoded (a dstack-0.6.0 guest whose OVMF is
edk2-stable202505: 17 events). Both logs replay to their hardware-signed quotes (see
tests/tdx_eventlog). Without those images' firmware, kernel and ACPI tables, what can be
checked is every event whose digest does not depend on them: its position, and its digest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pydstack.core.measure.tdx import (
    AcpiTables,
    OvmfVariant,
    acpi_tables_from_template,
    rtmr0_log,
    rtmr1_log,
    sha384,
    td_hob_digest,
)
from pydstack.core.measure.tdx._rtmr0 import stable_202505_boot_options
from pydstack.core.measure.tdx._uefi import (
    END_OF_DEVICE_PATH,
    fv_file_node,
    fv_node,
    load_option,
)

from .builders import acpi_blob, pe_image, tdvf_image

VECTORS = Path(__file__).parents[2] / "vectors" / "dstack"
EV_EFI_VARIABLE_BOOT = 0x80000002


def _pre_202505_log() -> list[dict[str, object]]:
    doc = json.loads((VECTORS / "quote-report.json").read_text())
    events: list[dict[str, object]] = json.loads(doc["event_log"])
    return events


def _stable_202505_log() -> list[dict[str, object]]:
    events: list[dict[str, object]] = json.loads(
        (VECTORS / "attestation.decoded.json").read_text()
    )["event_log"]
    return events


def _digests(events: list[dict[str, object]], imr: int) -> list[bytes]:
    return [bytes.fromhex(str(e["digest"])) for e in events if e["imr"] == imr]


def _our_rtmr0(variant: OvmfVariant) -> tuple[bytes, ...]:
    fw = tdvf_image([(0x1000, 0x1000, 0xFFFFF000, 0x1000, 0, 1), (0, 0, 0x809000, 0x2000, 2, 0)])
    acpi = AcpiTables(tables=b"t", rsdp=b"r", loader=b"l")
    return rtmr0_log(fw, acpi, memory_size=2 << 30, ovmf_variant=variant)


# Positions whose digests depend on nothing but OVMF and dstack's fixed choices: not the
# TD HOB (0: firmware, RAM), the ACPI blobs (shape) or the 202505 authority event (13).
PRE_FIXED = [1, 2, 3, 4, 5, 6, 7, 11, 12]
STABLE_FIXED = [1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 15, 16]


@pytest.mark.parametrize(
    ("variant", "events", "fixed"),
    [
        (OvmfVariant.PRE_202505, _pre_202505_log(), PRE_FIXED),
        (OvmfVariant.STABLE_202505, _stable_202505_log(), STABLE_FIXED),
    ],
    ids=["pre202505", "stable202505"],
)
def test_rtmr0_fixed_events_match_a_real_log(
    variant: OvmfVariant, events: list[dict[str, object]], fixed: list[int]
) -> None:
    """Same event count, and every shape-independent digest equal, position for position."""
    real = _digests(events, 0)
    ours = _our_rtmr0(variant)
    assert len(ours) == len(real)
    assert [ours[i].hex() for i in fixed] == [real[i].hex() for i in fixed]


@pytest.mark.parametrize("events", [_pre_202505_log(), _stable_202505_log()])
def test_rtmr1_fixed_events_match_a_real_log(events: list[dict[str, object]]) -> None:
    """After the kernel: the boot-option action, the separator and both ExitBootServices."""
    kernel = pe_image([(b"k" * 0x200, 0x400)]) + bytes(0x1000)
    ours = rtmr1_log(kernel, 0, 2 << 30)
    assert [d.hex() for d in ours[1:]] == [d.hex() for d in _digests(events, 1)[1:]]


def _variable_data(payload_hex: str) -> bytes:
    """The data part of a logged UEFI_VARIABLE_DATA: after GUID, two u64 lengths and the name."""
    raw = bytes.fromhex(payload_hex)
    name_chars = int.from_bytes(raw[16:24], "little")
    data_len = int.from_bytes(raw[24:32], "little")
    start = 32 + 2 * name_chars
    assert len(raw) == start + data_len
    return raw[start:]


def test_stable_202505_boot_options_are_the_logged_bytes() -> None:
    """Boot0000/Boot0001 we build are byte-identical to the variable data the real OVMF logged,
    and each logged digest is sha384 of that data alone."""
    boots = [e for e in _stable_202505_log() if e["event_type"] == EV_EFI_VARIABLE_BOOT]
    order, menu, setup = (_variable_data(str(e["event_payload"])) for e in boots)
    assert (order, *stable_202505_boot_options()) == (b"\0\0\x01\0", menu, setup)
    assert [sha384(d).hex() for d in (order, menu, setup)] == [str(e["digest"]) for e in boots]


def test_pre_202505_boot0000_constant_is_uiapp_on_the_frontpage_file() -> None:
    """dstack-mr's hard-coded pre-202505 Boot0000 digest is an active hidden app option
    "UiApp" pointing at OVMF's FrontPage file, exactly the data the real OVMF logged."""
    boot = [e for e in _pre_202505_log() if e["event_type"] == EV_EFI_VARIABLE_BOOT][1]
    rebuilt = load_option(
        0x109,
        "UiApp",
        (
            fv_node("7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1"),
            fv_file_node("462caa21-7614-4503-836e-8ab6f4662331"),
            END_OF_DEVICE_PATH,
        ),
    )
    assert rebuilt == _variable_data(str(boot["event_payload"]))
    assert sha384(rebuilt).hex() == boot["digest"] == _our_rtmr0(OvmfVariant.PRE_202505)[12].hex()


# The TD HOB and temporary-memory sections of OVMF's X64 TDX layout (read from Debian's
# OVMF.fd 2022.11; the real logs show dstack's OVMF uses the same): (address, size, type).
OVMF_TDX_MEMORY = [(0x810000, 0x10000, 3), (0x80B000, 0x2000, 3), (0x809000, 0x2000, 2)]
OVMF_TDX_MEMORY += [(0x800000, 0x6000, 3)]


@pytest.mark.parametrize(
    ("events", "memory"),
    [(_stable_202505_log(), 16 << 30), (_pre_202505_log(), 64 << 30)],
    ids=["16GiB", "64GiB"],
)
def test_td_hob_digest_matches_a_real_log(events: list[dict[str, object]], memory: int) -> None:
    """The first RTMR0 event of both real TDs, from their vm_config's memory_size (16 GiB for
    the dstack-0.6.0 guest, 64 GiB for the verifier fixture): RAM split at 2 GiB/4 GiB."""
    sections = [(0x1000, 0x1000, 0xFFFFF000, 0x1000, 0, 1)]
    sections += [(0, 0, addr, size, kind, 0) for addr, size, kind in OVMF_TDX_MEMORY]
    fw = tdvf_image(sections)
    assert td_hob_digest(fw, memory) == _digests(events, 0)[0]


# Table layouts that reproduce each real log's RSDP and loader digests. The RSDP digest
# alone fixes the RSDT offset (one 32-bit unknown); given it, one (DSDT, FACP, APIC) split
# of the bytes before it makes the loader digest match. Table contents do not enter either.
PRE_LAYOUT = [(b"FACS", 64), (b"DSDT", 9098), (b"FACP", 244), (b"APIC", 240)]
STABLE_LAYOUT = [(b"FACS", 64), (b"DSDT", 8802), (b"FACP", 244), (b"APIC", 286)]
TAIL = [(b"MCFG", 60), (b"WAET", 40), (b"RSDT", 52)]


@pytest.mark.parametrize(
    ("events", "layout", "at"),
    [(_pre_202505_log(), PRE_LAYOUT + TAIL, 8), (_stable_202505_log(), STABLE_LAYOUT + TAIL, 10)],
    ids=["pre202505", "stable202505"],
)
def test_loader_and_rsdp_digests_match_a_real_log(
    events: list[dict[str, object]], layout: list[tuple[bytes, int]], at: int
) -> None:
    """Our rebuilt etc/table-loader and etc/acpi/rsdp are the bytes the real OVMF measured."""
    acpi = acpi_tables_from_template(acpi_blob(layout))
    real = _digests(events, 0)
    assert (sha384(acpi.loader), sha384(acpi.rsdp)) == (real[at], real[at + 1])
