"""dstack-mr's TDX measurement computation: MRTD and RTMR0-2 from an image and a VM shape. Pure.

Bytes in, bytes out; reading the files and running ``dstack-acpi-tables`` are the caller's.

    machine = Machine(cpu_count=2, memory_size=2 << 30, qemu_version="9.2.1")
    m = measure(machine, firmware=fw, kernel=k, initrd=i, cmdline=cmdline + " initrd=initrd",
                acpi_tables=acpi_tables_from_template(tables))

- ``mrtd``: the TDVF sections replayed as TDH.MEM.PAGE.ADD / TDH.MR.EXTEND;
- ``rtmr0``: TD HOB, CFV, Secure Boot variables, ACPI blobs, boot variables (two OVMF layouts);
- ``rtmr1``: the kernel's Authenticode hash after QEMU patched its setup header, and fixed events;
- ``rtmr2``: the command line (UTF-16LE, NUL-terminated) and the initrd.
"""

from __future__ import annotations

from ._acpi import AcpiCommand, AcpiTables, acpi_tables_from_template, find_table
from ._digest import MeasureError, replay, sha384
from ._kernel import (
    ACPI_DATA_SIZE,
    authenticode_digest,
    cmdline_digest,
    patch_kernel,
    rtmr1,
    rtmr1_log,
    rtmr2,
    rtmr2_log,
)
from ._machine import (
    Machine,
    TdxMeasurementDetails,
    TdxMeasurements,
    VersionedOptions,
    acpi_tables_command,
    measure,
    measure_with_logs,
    ovmf_variant_for_image,
    ovmf_variant_for_version,
    parse_version,
    version_of_image_name,
    versioned_options,
)
from ._rtmr0 import OvmfVariant, rtmr0, rtmr0_log
from ._tdvf import TdvfSection, mrtd, td_hob, td_hob_digest, tdvf_sections

__all__ = [
    "ACPI_DATA_SIZE",
    "AcpiCommand",
    "AcpiTables",
    "Machine",
    "MeasureError",
    "OvmfVariant",
    "TdvfSection",
    "TdxMeasurementDetails",
    "TdxMeasurements",
    "VersionedOptions",
    "acpi_tables_command",
    "acpi_tables_from_template",
    "authenticode_digest",
    "cmdline_digest",
    "find_table",
    "measure",
    "measure_with_logs",
    "mrtd",
    "ovmf_variant_for_image",
    "ovmf_variant_for_version",
    "parse_version",
    "patch_kernel",
    "replay",
    "rtmr0",
    "rtmr0_log",
    "rtmr1",
    "rtmr1_log",
    "rtmr2",
    "rtmr2_log",
    "sha384",
    "td_hob",
    "td_hob_digest",
    "tdvf_sections",
    "version_of_image_name",
    "versioned_options",
]
