"""The ACPI blobs OVMF measures into RTMR0, and how dstack obtains them. Pure.

QEMU builds the ACPI tables for the VM's shape and hands OVMF three fw_cfg files:
``etc/acpi/tables``, ``etc/acpi/rsdp`` and ``etc/table-loader``; OVMF measures all three.
dstack gets the tables by running ``dstack-acpi-tables`` (its patched QEMU that prints
``etc/acpi/tables`` and exits) with the VM's QEMU options, then rebuilds the RSDP and the
loader script from the table offsets. Stock QEMU (Debian's 7.2 has no ``tdx-guest`` object)
cannot do this, so the tables are an input here: the output of ``dstack-acpi-tables`` for
the shape (``acpi_tables_command`` gives its argv), or the blobs of a prior measured run.

    tables = acpi_tables_from_template(dstack_acpi_tables_stdout)
"""

from __future__ import annotations

import msgspec

from ._digest import MeasureError, u32_at

LOADER_LENGTH = 4096  # fw_cfg etc/table-loader is padded to this size
_NAME_LEN = 56  # QEMU's BIOS_LINKER_LOADER_FILESZ
_TABLES, _RSDP = "etc/acpi/tables", "etc/acpi/rsdp"


class AcpiTables(msgspec.Struct, frozen=True, kw_only=True):
    """The three fw_cfg ACPI files as OVMF reads (and measures) them."""

    tables: bytes
    rsdp: bytes
    loader: bytes


class AcpiCommand(msgspec.Struct, frozen=True, kw_only=True):
    """How to run ``dstack-acpi-tables``: its argv and the extra environment."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]


def _name(file: str) -> bytes:
    return file.encode().ljust(_NAME_LEN, b"\0")


def _allocate(file: str, alignment: int, zone: int) -> bytes:
    return b"\x01\0\0\0" + _name(file) + alignment.to_bytes(4, "little") + bytes([zone]) + bytes(63)


def _add_pointer(pointer_file: str, pointee_file: str, offset: int, size: int) -> bytes:
    return (
        b"\x02\0\0\0"
        + _name(pointer_file)
        + _name(pointee_file)
        + offset.to_bytes(4, "little")
        + bytes([size])
        + bytes(7)
    )


def _add_checksum(file: str, result_offset: int, start: int, length: int) -> bytes:
    fields = b"".join(v.to_bytes(4, "little") for v in (result_offset, start, length))
    return b"\x03\0\0\0" + _name(file) + fields + bytes(56)


def find_table(tables: bytes, signature: bytes) -> tuple[int, int]:
    """Offset and length of the first table with ``signature``, walking table headers."""
    offset = 0
    while offset < len(tables):
        if offset + 8 > len(tables):
            break
        length = u32_at(tables, offset + 4, "ACPI table length")
        if tables[offset : offset + 4] == signature:
            return offset, length
        if length == 0:
            raise MeasureError(f"ACPI table with zero length at offset {offset}")
        offset += length
    raise MeasureError(f"ACPI table {signature.decode(errors='replace')} not found")


def acpi_tables_from_template(tables: bytes) -> AcpiTables:
    """The RSDP and loader script QEMU would serve alongside ``tables`` (dstack-mr's rebuild).

    ``tables`` must hold DSDT, FACP, APIC, MCFG, WAET and RSDT, as QEMU's q35 output does.
    """
    found = {sig: find_table(tables, sig) for sig in (b"DSDT", b"FACP", b"APIC", b"MCFG", b"WAET")}
    rsdt, rsdt_len = find_table(tables, b"RSDT")
    facp = found[b"FACP"][0]

    def checksum(sig: bytes) -> bytes:
        at, length = found[sig]
        return _add_checksum(_TABLES, at + 9, at, length)  # checksum byte at 9

    commands = [
        _allocate(_RSDP, 16, 2),  # zone 2: F-segment, as the RSDP must be
        _allocate(_TABLES, 64, 1),
        checksum(b"DSDT"),
        # FACP's FIRMWARE_CTRL, DSDT and X_DSDT fields point into the tables blob.
        _add_pointer(_TABLES, _TABLES, facp + 36, 4),
        _add_pointer(_TABLES, _TABLES, facp + 40, 4),
        _add_pointer(_TABLES, _TABLES, facp + 140, 8),
        checksum(b"FACP"),
        checksum(b"APIC"),
        checksum(b"MCFG"),
        checksum(b"WAET"),
        # The RSDT's four entries: FACP, APIC, MCFG, WAET.
        *(_add_pointer(_TABLES, _TABLES, rsdt + 36 + 4 * i, 4) for i in range(4)),
        _add_checksum(_TABLES, rsdt + 9, rsdt, rsdt_len),
        _add_pointer(_RSDP, _TABLES, 16, 4),
        _add_checksum(_RSDP, 8, 0, 20),
    ]
    loader = b"".join(commands).ljust(LOADER_LENGTH, b"\0")
    # ACPI 1.0 RSDP as QEMU serves it: checksum 0 and the RSDT's offset in the tables blob;
    # the loader script fixes both up after OVMF has measured the blob.
    rsdp = b"RSD PTR " + b"\0" + b"BOCHS " + b"\0" + rsdt.to_bytes(4, "little")
    return AcpiTables(tables=tables, rsdp=rsdp, loader=loader)
