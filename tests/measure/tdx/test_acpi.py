"""The RSDP and table-loader script rebuilt from a tables blob, and the dstack-acpi-tables argv."""

from __future__ import annotations

import struct

import pytest

from pydstack.core.measure.tdx import (
    Machine,
    MeasureError,
    acpi_tables_command,
    acpi_tables_from_template,
    find_table,
)

from .builders import Q35_LAYOUT, acpi_blob


def _command(kind: int, *fields: bytes | int) -> bytes:
    """A 128-byte QEMU BIOS linker/loader command, fields as QEMU's struct lays them out."""
    body = struct.pack("<I", kind)
    for f in fields:
        body += f.ljust(56, b"\0") if isinstance(f, bytes) else struct.pack("<I", f)
    return body.ljust(128, b"\0")


def test_loader_script_is_qemus_for_the_q35_layout() -> None:
    """For the real q35 layout: allocate, then each table's pointers and checksum in table
    order, then the RSDP's pointer and checksum; zero padded to 4096 bytes."""
    acpi = acpi_tables_from_template(acpi_blob(Q35_LAYOUT))
    tables, rsdp = b"etc/acpi/tables", b"etc/acpi/rsdp"

    def ptr(offset: int, size: int, src: bytes = tables) -> bytes:
        return (_command(2, src, tables, offset)[:120] + bytes([size])).ljust(128, b"\0")

    def csum(start: int, length: int) -> bytes:
        return _command(3, tables, start + 9, start, length)

    facp, rsdt = 7572, 8146
    expected = b"".join(
        [
            (_command(1, rsdp, 16)[:64] + b"\x02").ljust(128, b"\0"),
            (_command(1, tables, 64)[:64] + b"\x01").ljust(128, b"\0"),
            csum(64, 7508),
            ptr(facp + 36, 4),
            ptr(facp + 40, 4),
            ptr(facp + 140, 8),
            csum(facp, 244),
            csum(7816, 230),
            csum(8046, 60),
            csum(8106, 40),
            *(ptr(rsdt + 36 + 4 * i, 4) for i in range(4)),
            csum(rsdt, 52),
            ptr(16, 4, src=rsdp),
            _command(3, rsdp, 8, 0, 20),
        ]
    )
    assert acpi.loader == expected.ljust(4096, b"\0")


def test_rsdp_points_at_the_rsdt_offset_with_a_zero_checksum() -> None:
    acpi = acpi_tables_from_template(acpi_blob(Q35_LAYOUT))
    assert acpi.rsdp == b"RSD PTR \0BOCHS \0" + struct.pack("<I", 8146)


def test_table_order_moves_the_pointers() -> None:
    """Swapping two tables changes the offsets the loader script patches."""
    swapped = [Q35_LAYOUT[0], Q35_LAYOUT[2], Q35_LAYOUT[1], *Q35_LAYOUT[3:]]
    a = acpi_tables_from_template(acpi_blob(Q35_LAYOUT))
    b = acpi_tables_from_template(acpi_blob(swapped))
    assert a.loader != b.loader and a.rsdp == b.rsdp


@pytest.mark.parametrize("missing", [b"DSDT", b"FACP", b"APIC", b"MCFG", b"WAET", b"RSDT"])
def test_a_missing_table_is_an_error(missing: bytes) -> None:
    layout = [t for t in Q35_LAYOUT if t[0] != missing]
    with pytest.raises(MeasureError, match=f"{missing.decode()} not found"):
        acpi_tables_from_template(acpi_blob(layout, size=0))


def test_find_table_stops_at_a_zero_length() -> None:
    blob = acpi_blob([(b"FACS", 64)])[:64] + b"XXXX" + bytes(60)
    with pytest.raises(MeasureError, match="zero length"):
        find_table(blob, b"RSDT")


def test_acpi_command_for_a_plain_vm() -> None:
    """QEMU 8.2 defaults: pic=on; 9p sharing; a CD-ROM; the compat version in the env."""
    cmd = acpi_tables_command(
        Machine(cpu_count=4, memory_size=4 << 30, qemu_version="8.2.2"),
        firmware_path="/img/ovmf.fd",
        kernel_path="/img/bzImage",
    )
    argv = list(cmd.argv)
    assert argv[:8] == [
        "dstack-acpi-tables",
        "-cpu",
        "qemu64",
        "-smp",
        "4",
        "-m",
        "4096M",
        "-nographic",
    ]
    assert argv[argv.index("-bios") + 1] == "/img/ovmf.fd"
    assert (
        "local,path=/bin,mount_tag=host-shared,readonly=on,security_model=none,id=virtfs0" in argv
    )
    assert argv[argv.index("-cdrom") + 1] == "/bin/sh"
    assert argv[argv.index("-machine") + 1].endswith("hpet=off,smm=off,pic=on")
    assert cmd.env == (("QEMU_ACPI_COMPAT_VER", "8.2.2"),)


def test_acpi_command_for_a_gpu_vm() -> None:
    """GPUs behind a NUMA expander with hugepages, then NVSwitches on pcie.0, numbered on."""
    m = Machine(
        cpu_count=2,
        memory_size=8 << 30,
        hugepages=True,
        num_gpus=2,
        num_nvswitches=1,
        hotplug_off=True,
        pci_hole64_size=1 << 40,
        root_verity=True,
        host_share_mode="vvfat",
    )
    argv = list(acpi_tables_command(m, firmware_path="f", kernel_path="k").argv)
    ports = [a for a in argv if a.startswith("pcie-root-port")]
    assert ports == [
        "pcie-root-port,id=pci.0,bus=pcie.node0,chassis=0",
        "pcie-root-port,id=pci.1,bus=pcie.node0,chassis=1",
        "pcie-root-port,id=pci.2,bus=pcie.0,chassis=2",
    ]
    assert "node,nodeid=0,cpus=0-1,memdev=mem0" in argv
    assert "q35-pcihost.pci-hole64-size=0x10000000000" in argv
    assert "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off" in argv
    assert "virtio-blk-pci,drive=hd2" in argv and "virtio-blk-pci,drive=hd0" in argv
    assert "-cdrom" not in argv and "-virtfs" not in argv
    assert argv[argv.index("-machine") + 1].endswith("pic=off")  # QEMU 9.1 default


def test_acpi_command_refuses_an_unknown_share_mode() -> None:
    with pytest.raises(MeasureError, match="host_share_mode"):
        acpi_tables_command(
            Machine(cpu_count=1, memory_size=1 << 30, host_share_mode="nfs"),
            firmware_path="f",
            kernel_path="k",
        )
