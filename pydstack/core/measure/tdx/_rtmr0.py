"""RTMR0: what OVMF measures about the platform before it starts the kernel. Pure.

The TD HOB, the configuration firmware volume, the Secure Boot variables (all unset in
dstack), a separator, the three ACPI blobs, and the boot variables. OVMF built from
edk2-stable202505 (dstack images 0.5.10 up to 0.6.0, and from 0.6.1) logs 17 events; the
earlier build logs 13. Where the content is OVMF-internal, the digest is a constant taken
from dstack-mr.

    log = rtmr0_log(firmware, tables, memory_size=2 << 30, ovmf_variant=OvmfVariant.PRE_202505)
"""

from __future__ import annotations

import enum

from ._acpi import AcpiTables
from ._digest import replay, sha384
from ._tdvf import td_hob_digest
from ._uefi import (
    EFI_GLOBAL_VARIABLE,
    EFI_IMAGE_SECURITY_DATABASE,
    END_OF_DEVICE_PATH,
    LOAD_OPTION_ACTIVE,
    LOAD_OPTION_CATEGORY_APP,
    LOAD_OPTION_HIDDEN,
    boot_order,
    empty_variable_data,
    fv_file_node,
    fv_node,
    load_option,
)


class OvmfVariant(enum.Enum):
    """Which OVMF event layout RTMR0 follows (dstack's ``OvmfVariant``, same JSON names)."""

    PRE_202505 = "pre202505"
    STABLE_202505 = "stable202505"


# sha384 of the CFV (OVMF's variable store as shipped), hard-coded by dstack-mr.
CFV_DIGEST = bytes.fromhex(
    "344bc51c980ba621aaa00da3ed7436f7d6e549197dfe699515dfa2c6583d95e6"
    "412af21c097d473155875ffd561d6790"
)
# Pre-202505 OVMF's Boot0000 (UiApp) EFI_LOAD_OPTION digest, as dstack-mr has it.
PRE_202505_BOOT0000_DIGEST = bytes.fromhex(
    "23ada07f5261f12f34a0bd8e46760962d6b4d576a416f1fea1c64bc656b1d28e"
    "acf7047ae6e967c58fd2a98bfa74c298"
)
# dstack-mr's digest for the 14th event of the 202505 layout (it calls it the variable
# authority), a constant of its OVMF build. A real dstack-0.6.0 log logs an SMBIOS 3
# EV_EFI_HANDOFF_TABLES event there with another digest, so it may depend on the build.
STABLE_202505_AUTHORITY_DIGEST = bytes.fromhex(
    "fb66919801f1dfc9c4c273b6a739380790cb0fd3cb706a42f6ac050510ebc861"
    "8e7fba53a1564522f5c6f0dc9e1f41a6"
)
# GUIDs baked into OVMF's FV: the DXE volume, UiApp (BootManagerMenuApp) and FrontPage.
OVMF_DXE_FV = "7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1"
UIAPP_FILE = "eec25bdc-67f2-4d95-b1d5-f81b2039d11d"
FRONTPAGE_FILE = "462caa21-7614-4503-836e-8ab6f4662331"
# QEMU's fw_cfg "bootorder" for -kernel boot on q35: the DMA linuxboot option ROM alone.
FW_CFG_BOOTORDER = b"/rom@genroms/linuxboot_dma.bin\0"
_SEPARATOR = bytes(4)


def secure_boot_digests() -> tuple[bytes, ...]:
    """SecureBoot, PK, KEK, db and dbx, all unset, then the separator."""
    return (
        sha384(empty_variable_data(EFI_GLOBAL_VARIABLE, "SecureBoot")),
        sha384(empty_variable_data(EFI_GLOBAL_VARIABLE, "PK")),
        sha384(empty_variable_data(EFI_GLOBAL_VARIABLE, "KEK")),
        sha384(empty_variable_data(EFI_IMAGE_SECURITY_DATABASE, "db")),
        sha384(empty_variable_data(EFI_IMAGE_SECURITY_DATABASE, "dbx")),
        sha384(_SEPARATOR),
    )


def acpi_digests(acpi: AcpiTables) -> tuple[bytes, ...]:
    """In OVMF's order: the loader script, then the RSDP, then the tables."""
    return (sha384(acpi.loader), sha384(acpi.rsdp), sha384(acpi.tables))


def stable_202505_boot_options() -> tuple[bytes, bytes]:
    """Boot0000 (BootManagerMenuApp, hidden) and Boot0001 (EFI Firmware Setup) as published."""
    app = LOAD_OPTION_ACTIVE | LOAD_OPTION_CATEGORY_APP
    menu = load_option(
        app | LOAD_OPTION_HIDDEN,
        "BootManagerMenuApp",
        (fv_node(OVMF_DXE_FV), fv_file_node(UIAPP_FILE), END_OF_DEVICE_PATH),
    )
    setup = load_option(
        app,
        "EFI Firmware Setup",
        (fv_node(OVMF_DXE_FV), fv_file_node(FRONTPAGE_FILE), END_OF_DEVICE_PATH),
    )
    return menu, setup


def rtmr0_log(
    firmware: bytes, acpi: AcpiTables, *, memory_size: int, ovmf_variant: OvmfVariant
) -> tuple[bytes, ...]:
    """The RTMR0 event digests, in log order, for a TD of ``memory_size`` bytes."""
    hob = td_hob_digest(firmware, memory_size)
    if ovmf_variant is OvmfVariant.PRE_202505:
        return (
            hob,
            CFV_DIGEST,
            *secure_boot_digests(),
            *acpi_digests(acpi),
            sha384(b"\0\0"),  # BootOrder: this build logs 2 zero bytes
            PRE_202505_BOOT0000_DIGEST,
        )
    menu, setup = stable_202505_boot_options()
    return (
        hob,
        CFV_DIGEST,
        sha384(b"\0\0"),  # fw_cfg bootmenu: a u16, 0 since dstack does not ask for a menu
        sha384(FW_CFG_BOOTORDER),
        *secure_boot_digests(),
        *acpi_digests(acpi),
        STABLE_202505_AUTHORITY_DIGEST,
        sha384(boot_order((0x0000, 0x0001))),
        sha384(menu),
        sha384(setup),
    )


def rtmr0(
    firmware: bytes, acpi: AcpiTables, *, memory_size: int, ovmf_variant: OvmfVariant
) -> bytes:
    return replay(rtmr0_log(firmware, acpi, memory_size=memory_size, ovmf_variant=ovmf_variant))
