"""A dstack VM's shape and its expected TDX measurements (dstack-mr's ``Machine``). Pure.

machine = Machine(cpu_count=2, memory_size=2 << 30, qemu_version="9.2.1")
m = measure(machine, firmware=fw, kernel=k, initrd=i, cmdline=cmdline + " initrd=initrd")
m.rtmr0 is None  # unless acpi_tables= gives the shape's ACPI tables
"""

from __future__ import annotations

import msgspec

from ._acpi import AcpiCommand, AcpiTables
from ._digest import MeasureError, parse_u32, replay
from ._kernel import ACPI_DATA_SIZE, rtmr1_log, rtmr2_log
from ._rtmr0 import OvmfVariant, rtmr0_log
from ._tdvf import mrtd

Version = tuple[int, int, int]
DEFAULT_QEMU_VERSION: Version = (9, 1, 0)  # what dstack-mr assumes when none is given


class Machine(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The VM options a measurement depends on; ``None`` means the QEMU version's default."""

    cpu_count: int
    memory_size: int  # bytes
    hugepages: bool = False
    num_gpus: int = 0
    num_nvswitches: int = 0
    hotplug_off: bool = False
    pic: bool | None = None
    two_pass_add_pages: bool | None = None
    qemu_version: str | None = None  # "MAJOR.MINOR.PATCH"
    pci_hole64_size: int | None = None
    smm: bool = False
    root_verity: bool = False
    host_share_mode: str = ""  # "" or "9p", "vvfat" or "vhd"
    ovmf_variant: OvmfVariant = OvmfVariant.PRE_202505


class VersionedOptions(msgspec.Struct, frozen=True, kw_only=True):
    version: Version
    pic: bool
    two_pass_add_pages: bool


class TdxMeasurements(msgspec.Struct, frozen=True, kw_only=True):
    """MRTD and RTMR0-2 (48 bytes each); ``rtmr0`` is None without the ACPI tables."""

    mrtd: bytes
    rtmr0: bytes | None
    rtmr1: bytes
    rtmr2: bytes


class TdxMeasurementDetails(msgspec.Struct, frozen=True, kw_only=True):
    """The measurements and the event digests each RTMR replays."""

    measurements: TdxMeasurements
    rtmr0_log: tuple[bytes, ...] | None
    rtmr1_log: tuple[bytes, ...]
    rtmr2_log: tuple[bytes, ...]


def parse_version(text: str) -> Version:
    """``MAJOR.MINOR.PATCH`` as three integers."""
    values = [parse_u32(p) for p in text.split(".")]
    nums = [v for v in values if v is not None]
    if len(values) != 3 or len(nums) != 3:
        raise MeasureError(f"version {text!r} is not MAJOR.MINOR.PATCH")
    return nums[0], nums[1], nums[2]


def versioned_options(machine: Machine) -> VersionedOptions:
    """Defaults that follow the QEMU version: QEMU 8.x (TDX patches of that era) emulated
    the legacy PIC and added all of a section's pages before measuring them."""
    given = machine.qemu_version
    version = DEFAULT_QEMU_VERSION if given is None else parse_version(given)
    if version < (8, 0, 0):
        raise MeasureError(f"QEMU {'.'.join(map(str, version))} is not supported (8.0 or later)")
    qemu8 = (8, 0, 0) <= version < (9, 0, 0)
    pic, two_pass = machine.pic, machine.two_pass_add_pages
    return VersionedOptions(
        version=version,
        pic=qemu8 if pic is None else pic,
        two_pass_add_pages=qemu8 if two_pass is None else two_pass,
    )


def ovmf_variant_for_version(version: str) -> OvmfVariant:
    """The OVMF a dstack OS version ships: edk2-stable202505 in [0.5.10, 0.6.0) and from 0.6.1."""
    v = parse_version(version)
    stable = (0, 5, 10) <= v < (0, 6, 0) or v >= (0, 6, 1)
    return OvmfVariant.STABLE_202505 if stable else OvmfVariant.PRE_202505


def version_of_image_name(image: str) -> str | None:
    """``X.Y.Z`` from names like ``dstack-0.5.10``, ``dstack-nvidia-dev-0.6.1.rc1``; else None."""
    tail = image.rsplit("-", 1)[-1]
    parts = tail.split(".")
    if not 3 <= len(parts) <= 4 or any(parse_u32(p) is None for p in parts[:3]):
        return None
    if len(parts) == 4 and not parts[3]:
        return None
    return ".".join(parts[:3])


def ovmf_variant_for_image(image: str | None) -> OvmfVariant:
    """The variant for an image name, pre-202505 when it carries no usable version."""
    version = version_of_image_name(image) if image is not None else None
    if version is None:
        return OvmfVariant.PRE_202505
    try:
        return ovmf_variant_for_version(version)
    except MeasureError:
        return OvmfVariant.PRE_202505


def acpi_tables_command(machine: Machine, *, firmware_path: str, kernel_path: str) -> AcpiCommand:
    """The ``dstack-acpi-tables`` invocation dstack-mr runs for ``machine``.

    Its stdout is ``etc/acpi/tables``; feed it to ``acpi_tables_from_template``. The disks
    and shared folder are placeholders: only the devices' presence shapes the tables.
    """
    if machine.cpu_count <= 0:
        raise MeasureError("cpu_count must be greater than 0")
    mem_mb = machine.memory_size // (1024 * 1024)
    disk, shared = "/bin/sh", "/bin"

    def drive(name: str) -> list[str]:
        return [
            "-drive",
            f"file={disk},if=none,id={name},format=raw,readonly=on",
            "-device",
            f"virtio-blk-pci,drive={name}",
        ]

    argv = ["dstack-acpi-tables", "-cpu", "qemu64", "-smp", str(machine.cpu_count)]
    argv += ["-m", f"{mem_mb}M", "-nographic", "-nodefaults", "-serial", "stdio"]
    argv += ["-bios", firmware_path, "-kernel", kernel_path, "-initrd", disk, *drive("hd1")]
    argv += ["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0"]
    argv += ["-object", "tdx-guest,id=tdx", "-device", "vhost-vsock-pci,guest-cid=3"]
    if machine.host_share_mode in ("", "9p"):
        virtfs = f"local,path={shared},mount_tag=host-shared,readonly=on,security_model=none"
        argv += ["-virtfs", f"{virtfs},id=virtfs0"]
    elif machine.host_share_mode in ("vvfat", "vhd"):
        argv += drive("hd2")
    else:
        raise MeasureError(f"host_share_mode {machine.host_share_mode!r}: use 9p, vvfat or vhd")
    argv += drive("hd0") if machine.root_verity else ["-cdrom", disk]
    opts = versioned_options(machine)
    smm, pic = ("on" if machine.smm else "off"), ("on" if opts.pic else "off")
    argv += [
        "-machine",
        f"q35,kernel-irqchip=split,confidential-guest-support=tdx,hpet=off,smm={smm},pic={pic}",
    ]
    if machine.hugepages:
        argv += ["-numa", f"node,nodeid=0,cpus=0-{machine.cpu_count - 1},memdev=mem0"]
        argv += [
            "-object",
            f"memory-backend-file,id=mem0,size={mem_mb}M,mem-path=/dev/hugepages,"
            "share=on,prealloc=no,host-nodes=0,policy=bind",
        ]
    buses: list[str] = []
    if machine.num_gpus > 0:
        argv += ["-object", "iommufd,id=iommufd0"]
        gpu_bus = "pcie.0"
        if machine.hugepages:
            argv += ["-device", "pxb-pcie,id=pcie.node0,bus=pcie.0,addr=10,numa_node=0,bus_nr=5"]
            gpu_bus = "pcie.node0"
        buses += [gpu_bus] * machine.num_gpus
    buses += ["pcie.0"] * machine.num_nvswitches  # NVSwitches stay on the root bus
    for port, bus in enumerate(buses):
        argv += ["-device", f"pcie-root-port,id=pci.{port},bus={bus},chassis={port}"]
        argv += ["-device", f"vfio-pci,host=00:00.0,bus=pci.{port},iommufd=iommufd0"]
    if machine.hotplug_off:
        argv += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
    if machine.pci_hole64_size is not None:
        argv += ["-global", f"q35-pcihost.pci-hole64-size={machine.pci_hole64_size:#x}"]
    # The patched QEMU picks the ACPI layout of the QEMU version the host runs.
    compat = ".".join(map(str, opts.version))
    return AcpiCommand(argv=tuple(argv), env=(("QEMU_ACPI_COMPAT_VER", compat),))


def measure_with_logs(
    machine: Machine,
    *,
    firmware: bytes,
    kernel: bytes,
    initrd: bytes,
    cmdline: str,
    acpi_tables: AcpiTables | None = None,
) -> TdxMeasurementDetails:
    """All four registers and their logs; RTMR0 only when ``acpi_tables`` is given."""
    opts = versioned_options(machine)
    log0 = (
        None
        if acpi_tables is None
        else rtmr0_log(
            firmware,
            acpi_tables,
            memory_size=machine.memory_size,
            ovmf_variant=machine.ovmf_variant,
        )
    )
    log1 = rtmr1_log(kernel, len(initrd), machine.memory_size, ACPI_DATA_SIZE)
    log2 = rtmr2_log(cmdline, initrd)
    measurements = TdxMeasurements(
        mrtd=mrtd(firmware, two_pass_add_pages=opts.two_pass_add_pages),
        rtmr0=None if log0 is None else replay(log0),
        rtmr1=replay(log1),
        rtmr2=replay(log2),
    )
    return TdxMeasurementDetails(
        measurements=measurements, rtmr0_log=log0, rtmr1_log=log1, rtmr2_log=log2
    )


def measure(
    machine: Machine,
    *,
    firmware: bytes,
    kernel: bytes,
    initrd: bytes,
    cmdline: str,
    acpi_tables: AcpiTables | None = None,
) -> TdxMeasurements:
    """dstack-mr's ``Machine::measure``, with the files' bytes and the ACPI tables passed in."""
    return measure_with_logs(
        machine,
        firmware=firmware,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        acpi_tables=acpi_tables,
    ).measurements
