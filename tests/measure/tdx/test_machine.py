"""The VM shape's version-dependent defaults, OVMF variant choice, and ``measure`` wiring."""

from __future__ import annotations

import msgspec
import pytest

from pydstack.core.measure.tdx import (
    AcpiTables,
    Machine,
    MeasureError,
    OvmfVariant,
    measure,
    measure_with_logs,
    mrtd,
    ovmf_variant_for_image,
    ovmf_variant_for_version,
    replay,
    rtmr0,
    rtmr1,
    rtmr2,
    version_of_image_name,
    versioned_options,
)

from .builders import pattern, pe_image, tdvf_image


@pytest.mark.parametrize(
    ("qemu", "pic", "two_pass"),
    [(None, False, False), ("8.0.0", True, True), ("8.2.2", True, True), ("9.0.0", False, False)],
)
def test_defaults_follow_the_qemu_version(qemu: str | None, pic: bool, two_pass: bool) -> None:
    """QEMU 8.x: PIC on and two-pass page adds; 9.x (and the 9.1 default): neither."""
    opts = versioned_options(Machine(cpu_count=1, memory_size=1 << 30, qemu_version=qemu))
    assert (opts.pic, opts.two_pass_add_pages) == (pic, two_pass)


def test_explicit_options_win_over_the_version() -> None:
    m = Machine(
        cpu_count=1, memory_size=1, qemu_version="8.2.2", pic=False, two_pass_add_pages=False
    )
    opts = versioned_options(m)
    assert (opts.version, opts.pic, opts.two_pass_add_pages) == ((8, 2, 2), False, False)


@pytest.mark.parametrize("qemu", ["7.2.0", "9.1", "9.1.0.1", "v9.1.0", "9.x.0"])
def test_unusable_qemu_versions_are_refused(qemu: str) -> None:
    with pytest.raises(MeasureError):
        versioned_options(Machine(cpu_count=1, memory_size=1, qemu_version=qemu))


# dstack-mr's own cases (lib.rs tests).
@pytest.mark.parametrize("v", ["0.4.99", "0.5.7", "0.5.8", "0.5.9", "0.6.0"])
def test_older_versions_ship_pre_202505_ovmf(v: str) -> None:
    assert ovmf_variant_for_version(v) is OvmfVariant.PRE_202505


@pytest.mark.parametrize("v", ["0.5.10", "0.5.99", "0.6.1", "0.6.2", "0.7.0", "1.0.0"])
def test_newer_versions_ship_stable_202505_ovmf(v: str) -> None:
    assert ovmf_variant_for_version(v) is OvmfVariant.STABLE_202505


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("dstack-0.5.10", "0.5.10"),
        ("dstack-dev-0.5.10", "0.5.10"),
        ("dstack-nvidia-dev-0.6.1", "0.6.1"),
        ("dstack-0.5.10.rc1", "0.5.10"),
        ("dstack-nvidia-dev-0.5.10.1", "0.5.10"),
        ("dstack", None),
        ("dstack-rc1", None),
        ("dstack-0.5", None),
        ("dstack-0.5.10.", None),
        ("dstack-0.5.10.1.2", None),
        ("dstack-0..10", None),
        ("dstack-a.b.c", None),
    ],
)
def test_version_of_image_name(name: str, version: str | None) -> None:
    assert version_of_image_name(name) == version


def test_variant_for_image_falls_back_to_pre_202505() -> None:
    assert [
        ovmf_variant_for_image(n) for n in (None, "dstack", "dstack-0.5.9", "dstack-0.5.10")
    ] == [
        OvmfVariant.PRE_202505,
        OvmfVariant.PRE_202505,
        OvmfVariant.PRE_202505,
        OvmfVariant.STABLE_202505,
    ]


def test_machine_json_uses_dstacks_variant_names_and_refuses_unknown_fields() -> None:
    m = msgspec.json.decode(
        b'{"cpu_count":2,"memory_size":1024,"ovmf_variant":"stable202505"}', type=Machine
    )
    assert m.ovmf_variant is OvmfVariant.STABLE_202505
    with pytest.raises(msgspec.ValidationError, match="cpus"):
        msgspec.json.decode(b'{"cpu_count":2,"memory_size":1,"cpus":2}', type=Machine)


FW = tdvf_image([(0x1000, 0x2000, 0xFFFFE000, 0x2000, 0, 1), (0, 0, 0x809000, 0x2000, 2, 0)])
KERNEL = pe_image([(pattern(0x1000, b"k"), 0x400)])
INITRD = b"initrd" * 100
ACPI = AcpiTables(tables=b"tables", rsdp=b"rsdp", loader=b"loader")


def test_measure_combines_the_registers_for_the_shape() -> None:
    """QEMU 8.2 means two-pass MRTD; RTMR0 needs the ACPI tables and the variant."""
    m = Machine(
        cpu_count=2,
        memory_size=3 << 30,
        qemu_version="8.2.2",
        ovmf_variant=OvmfVariant.STABLE_202505,
    )
    got = measure(m, firmware=FW, kernel=KERNEL, initrd=INITRD, cmdline="c", acpi_tables=ACPI)
    assert got.mrtd == mrtd(FW, two_pass_add_pages=True)
    assert got.rtmr0 == rtmr0(FW, ACPI, memory_size=3 << 30, ovmf_variant=OvmfVariant.STABLE_202505)
    assert got.rtmr1 == rtmr1(KERNEL, len(INITRD), 3 << 30)
    assert got.rtmr2 == rtmr2("c", INITRD)


def test_without_acpi_tables_rtmr0_is_unknown_and_logs_replay() -> None:
    m = Machine(cpu_count=1, memory_size=2 << 30)
    details = measure_with_logs(m, firmware=FW, kernel=KERNEL, initrd=INITRD, cmdline="c")
    assert details.measurements.rtmr0 is None and details.rtmr0_log is None
    assert details.measurements.mrtd == mrtd(FW, two_pass_add_pages=False)
    assert replay(details.rtmr1_log) == details.measurements.rtmr1
    assert replay(details.rtmr2_log) == details.measurements.rtmr2


def test_the_variants_differ_and_the_shape_matters() -> None:
    """Both OVMF layouts and two RAM sizes give four distinct RTMR0s."""
    values = {
        rtmr0(FW, ACPI, memory_size=size, ovmf_variant=variant)
        for variant in OvmfVariant
        for size in (2 << 30, 4 << 30)
    }
    assert len(values) == 4
