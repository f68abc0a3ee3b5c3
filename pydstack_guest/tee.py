"""Where the QEMU guest's quotes come from, decided once at boot: configfs-tsm or the simulator.

The host names the VM's platform in the share (``platform.json``: ``{"platform": "tdx" |
"kvm" | "tcg", "os_image_hash": hex}``, written by the QEMU backend), but the host is
untrusted, so the guest's own kernel decides wherever it can (`choose_tee`, pure):

- configfs-tsm present (``/sys/kernel/config/tsm/report``): real TDX whatever the host
  claims. Quotes from the kernel, RTMRs through the TSM measurements sysfs, the boot log from
  the CCEL table, a KMS checked against Intel's root (collateral from sys-config's PCCS). A
  dev PKI in the share is never read: a host that slipped one in could otherwise attest a KMS
  of its own to this CVM and hand it keys it knows.
- no configfs-tsm on a VM whose platform is ``tdx``, or whose CPU says it is a TD (the
  ``tdx_guest`` flag in /proc/cpuinfo: the host cannot talk a TD into simulating): the boot
  fails at ``tee`` in one line, never falls back to the simulator.
- no configfs-tsm on a simulated platform (``tcg``, ``kvm``: no TEE): the simulator, with the
  share's dev PKI (``pydstack_guest.simulated``), said in the ``tee`` stage.
- no platform named, or one we do not know: fails at ``tee``.

The chosen TD is reported as the ``tee`` boot stage (``VmBootProgress``)::

    td = open_td(share, shared, state_dir=..., name=..., vcpu=..., memory_mb=...)
    booted = await boot_td(shared, td, ...)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import msgspec

from pydstack.adapters.tdx.configfs import TSM_MEASUREMENTS, TSM_REPORT_ROOT
from pydstack.core.measure import ImageParts

from .boot import BootFailed, HostShared, SysConfig
from .td_boot import Td, TeeKind

SIMULATED_PLATFORMS = frozenset({"tcg", "kvm"})  # QEMU platforms with no TEE
CCEL = "/sys/firmware/acpi/tables/data/CCEL"  # the TD's boot event log (RTMR0-2)
PLATFORM_FILE, DEV_TD_FILE, DEV_PKI_DIR = "platform.json", "dev-td.json", "dev-pki"


@dataclass(frozen=True)
class TeePaths:
    """The guest kernel's TDX interfaces (tests point them at an emulated kernel)."""

    report_root: Path = Path(TSM_REPORT_ROOT)
    measurements: Path = Path(TSM_MEASUREMENTS)
    ccel: Path = Path(CCEL)
    cpuinfo: Path = Path("/proc/cpuinfo")


class PlatformDoc(msgspec.Struct, frozen=True):
    platform: str = ""
    os_image_hash: str = ""


class TeeFacts(msgspec.Struct, frozen=True, kw_only=True):
    platform: str  # the host's claim ("" when it names none)
    configfs_tsm: bool  # the guest kernel has configfs-tsm's report directory
    tdx_cpu: bool = False  # the kernel found itself in a TD (cpuinfo flag tdx_guest)
    dev_td: bool  # the share describes a simulated TD (dev-td.json)


def choose_tee(facts: TeeFacts) -> tuple[TeeKind, str]:
    """(which TEE, why) for a guest with `facts`; raises `BootFailed` at ``tee``."""
    if facts.configfs_tsm:
        why = "the guest kernel has configfs-tsm"
        if facts.platform != "tdx":
            why += f" (the host said platform {facts.platform or 'nothing'}; the kernel wins)"
        if facts.dev_td:
            why += "; the dev PKI the host share offers is ignored"
        return "tdx", why
    where = f"no configfs-tsm at {TSM_REPORT_ROOT}"
    if facts.platform == "tdx" or facts.tdx_cpu:
        what = "platform tdx" if facts.platform == "tdx" else "the CPU is a TD (tdx_guest)"
        raise BootFailed("tee", f"{what} but {where} (the guest kernel needs TDX and "
                         "CONFIG_TSM_REPORTS, Linux >= 6.7): refusing to simulate a TDX "
                         "VM")  # fmt: skip
    if facts.platform in SIMULATED_PLATFORMS:
        if not facts.dev_td:
            raise BootFailed("tee", f"platform {facts.platform} has no TEE and the host share "
                             f"has no {DEV_TD_FILE} (the VMM runs without a dev PKI)")  # fmt: skip
        return "simulated", f"platform {facts.platform} has no TEE, {where}"
    named = repr(facts.platform) if facts.platform else "none"
    raise BootFailed("tee", f"{where} and the host names platform {named} in {PLATFORM_FILE} "
                     f"(want one of tdx, {', '.join(sorted(SIMULATED_PLATFORMS))})")  # fmt: skip


def read_platform(share: Path) -> PlatformDoc:
    try:
        return msgspec.json.decode((share / PLATFORM_FILE).read_bytes(), type=PlatformDoc)
    except FileNotFoundError:
        return PlatformDoc()
    except (OSError, msgspec.DecodeError) as e:
        raise BootFailed("tee", f"{PLATFORM_FILE} in the host share: {e}") from None


def tdx_cpu(cpuinfo: Path) -> bool:
    """Whether the kernel runs in a TD: x86's ``tdx_guest`` CPU flag (set from CPUID 0x21)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return any("tdx_guest" in line.split() for line in text.splitlines()
               if line.startswith("flags"))  # fmt: skip


def _hash(value: str, where: str) -> bytes:
    try:
        h = bytes.fromhex(value)
    except ValueError:
        h = b""
    if len(h) != 32:
        raise BootFailed("host-shared", f"{where}: os_image_hash is not 32 bytes of hex")
    return h


def open_td(
    share: Path, shared: HostShared, *, state_dir: Path, name: str, vcpu: int, memory_mb: int,
    paths: TeePaths | None = None,
) -> Td:  # fmt: skip
    """The TD this guest boots on (see the module docs); raises `BootFailed` at ``tee``."""
    paths = paths or TeePaths()
    doc = read_platform(share)
    facts = TeeFacts(platform=doc.platform, configfs_tsm=paths.report_root.is_dir(),
                     tdx_cpu=tdx_cpu(paths.cpuinfo),
                     dev_td=(share / DEV_TD_FILE).exists())  # fmt: skip
    kind, why = choose_tee(facts)
    if kind == "tdx":
        return _configfs_td(shared, doc, why, paths, state_dir, name, vcpu, memory_mb)
    return _simulated_td(share, shared, facts.platform, why, state_dir, name, vcpu, memory_mb)


def _configfs_td(
    shared: HostShared, doc: PlatformDoc, why: str, paths: TeePaths, state_dir: Path,
    name: str, vcpu: int, memory_mb: int,
) -> Td:  # fmt: skip
    from pydstack.adapters.tdx.ccel import parse_ccel
    from pydstack.adapters.tdx.configfs import ConfigfsBackend
    from pydstack.adapters.tdx.errors import TdxError

    from .kms_trust import KmsTrust

    try:
        events = parse_ccel(paths.ccel.read_bytes())
    except OSError as e:
        raise BootFailed("tee", f"no boot event log at {paths.ccel}: {e.strerror}") from None
    except TdxError as e:
        raise BootFailed("tee", f"boot event log {paths.ccel}: {e}") from None
    backend = ConfigfsBackend(report_root=paths.report_root, measurements_dir=paths.measurements,
                              boot_events=events)  # fmt: skip
    try:
        found = backend.probe()
    except TdxError as e:
        raise BootFailed("tee", str(e)) from None
    try:
        sysc = msgspec.json.decode(shared.sys_config, type=SysConfig)
    except msgspec.DecodeError as e:
        raise BootFailed("host-shared", f"sys-config: {e}") from None
    trust = KmsTrust.intel(sysc.pccs_url or "")  # None: dstack's unset
    return Td(kind="tdx", backend=backend, kms_trust=trust,
              detail=f"{why}; {found}; KMS evidence checked against Intel's root",
              os_image_hash=_hash(doc.os_image_hash, PLATFORM_FILE), state_dir=state_dir,
              name=name, vcpu=vcpu, memory_mb=memory_mb)  # fmt: skip


def _simulated_td(
    share: Path, shared: HostShared, platform: str, why: str, state_dir: Path, name: str,
    vcpu: int, memory_mb: int,
) -> Td:  # fmt: skip
    from .simulated import SimulatedTd, simulated_td

    try:
        dev = json.loads((share / DEV_TD_FILE).read_text())
        parts = msgspec.convert(dev.get("image"), ImageParts)
    except (OSError, ValueError, AttributeError, msgspec.ValidationError) as e:
        raise BootFailed("host-shared", f"{DEV_TD_FILE}: {e}") from None
    if not (share / DEV_PKI_DIR / "root.der").is_file():  # never one made up here
        raise BootFailed("host-shared", f"{DEV_TD_FILE} but no {DEV_PKI_DIR}/ in the share")
    td = SimulatedTd(pki_dir=share / DEV_PKI_DIR, state_dir=state_dir,
                     os_image_hash=_hash(str(dev.get("os_image_hash", "")), DEV_TD_FILE),
                     image=parts, name=name, vcpu=vcpu, memory_mb=memory_mb)  # fmt: skip
    return simulated_td(shared, td, why)
