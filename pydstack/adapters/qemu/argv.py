"""QEMU command lines for CVMs: pure, from a ``QemuSpec`` to ``list[str]``.

Three platforms:

- ``tdx``: KVM with a ``tdx-guest`` object and ``confidential-guest-support=tdx``; the app's
  identity goes into ``mrconfigid`` (dstack's MrConfig: ``0x01 || sha256(app-compose.json)``
  zero-padded to 48 bytes, base64), TDVF firmware from the image; the object is JSON, as
  dstack's VMM (v0.5.11) writes it, with the quote-generation socket (host vsock, QGS port)
  when one is set.
- ``kvm``: the same machine without a TEE (dstack's ``no_tee``).
- ``tcg``: software emulation for hosts without KVM (these CI machines): no TEE, no vsock
  device unless a CID is given (vhost-vsock needs the host's ``/dev/vhost-vsock``).

Whatever the platform, the guest also gets a virtio-serial port ``org.pydstack.events`` backed
by a file, so boot progress reaches the host without vsock, and the serial console goes to a
file opened with ``append=on`` (the supervisor rotates it by copy and truncate).

Port maps apply in every networking mode. In ``user`` mode they are ``hostfwd`` rules on the
one NIC. In ``bridge`` mode dstack drops them (#1155); here a second, restricted user-mode NIC
carries them: ``restrict=on`` keeps the guest from reaching the host or the outside through it,
while the explicit forwards still work. The guest image gives that NIC (``eth1``) a low-priority
default route, so egress stays on the bridge.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Final, Literal

import msgspec

from pydstack.core.events import PortMap
from pydstack.core.portmap import port_map_error

Platform = Literal["tdx", "kvm", "tcg"]
EVENTS_PORT_NAME: Final = "org.pydstack.events"
SHARE_TAG: Final = "host-shared"  # dstack's mount tag
DATA_SERIAL: Final = "pydstack-data"  # the data disk's serial (pydstack_guest.data_disk.SERIAL)


class ArgvError(ValueError):
    """The spec cannot become a command line; the message names the field."""


class PortForward(msgspec.Struct, frozen=True, kw_only=True):
    protocol: Literal["tcp", "udp"] = "tcp"
    host_address: str = "127.0.0.1"
    host_port: int
    vm_port: int


class Disk(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    format: Literal["qcow2", "raw"] = "qcow2"
    readonly: bool = False
    serial: str = ""  # the virtio-blk serial the guest finds it by (/sys/block/vdX/serial)


class Network(msgspec.Struct, frozen=True, kw_only=True):
    mode: Literal["user", "bridge"] = "user"
    bridge: str = ""  # bridge mode: the host bridge (allowed in /etc/qemu/bridge.conf)
    net: str = "10.0.2.0/24"  # user mode: slirp subnet and first DHCP lease (= hostfwd target)
    dhcp_start: str = "10.0.2.10"
    restrict: bool = False
    forward_net: str = "10.0.3.0/24"  # bridge mode: the port-forwarding NIC's subnet
    forward_dhcp_start: str = "10.0.3.10"


class HostShare(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    mode: Literal["9p", "virtiofs"] = "9p"
    readonly: bool = True
    virtiofs_socket: str = ""  # virtiofs: the socket of a virtiofsd serving ``path``


class QemuSpec(msgspec.Struct, frozen=True, kw_only=True):
    vm_id: str
    platform: Platform
    vcpu: int
    memory_mb: int
    kernel: str
    initrd: str
    cmdline: str = ""
    bios: str = ""
    qemu: str = "qemu-system-x86_64"
    rootfs: Disk | None = None  # read-only root (dstack's verity rootfs)
    disk: Disk | None = None  # the VM's own disk (qcow2, possibly backed by the image's hda)
    data_disk: Disk | None = None  # persistent data (the guest makes it LUKS2: serial DATA_SERIAL)
    cid: int | None = None
    share: HostShare | None = None
    network: Network = Network()
    ports: tuple[PortForward, ...] = ()
    mrconfigid: bytes | None = None  # 48 bytes (tdx only)
    qgs_port: int | None = None  # tdx: quote generation service on the host's vsock
    qmp_socket: str = ""
    serial_log: str = ""
    events_log: str = ""


def mrconfigid_v1(compose_hash: bytes) -> bytes:
    """dstack MrConfig V1 for a 32-byte compose hash: ``0x01 || hash``, zero-padded to 48."""
    if len(compose_hash) != 32:
        raise ArgvError(f"compose_hash: want 32 bytes (sha256), got {len(compose_hash)}")
    return (b"\x01" + compose_hash).ljust(48, b"\x00")


def mrconfigid_for_compose(app_compose: bytes) -> bytes:
    """The mrconfigid dstack's VMM gives a TDX guest running this exact app-compose.json."""
    return mrconfigid_v1(hashlib.sha256(app_compose).digest())


def mac_address(vm_id: str, index: int) -> str:
    """A stable, locally administered MAC per VM and NIC (QEMU's 52:54:00 prefix)."""
    d = hashlib.sha256(f"{vm_id}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in d[:3])


def _opt(value: str) -> str:
    """Escape a value inside a QEMU ``key=value,...`` option string (commas double)."""
    return value.replace(",", ",,")


def _hostfwds(ports: tuple[PortForward, ...]) -> str:
    # _validate made each address an IP literal; escaped all the same, so no value can ever
    # end this option and start another (guestfwd=...-cmd: runs host commands).
    def addr(a: str) -> str:
        return f"[{a}]" if ":" in a else a

    return "".join(
        ",hostfwd=" + _opt(f"{p.protocol}:{addr(p.host_address)}:{p.host_port}-:{p.vm_port}")
        for p in ports
    )


def _validate(s: QemuSpec) -> None:
    if not s.vm_id or any(c in s.vm_id for c in ", /="):
        raise ArgvError(f"vm_id {s.vm_id!r}: no commas, spaces, slashes or '='")
    if s.vcpu < 1 or s.memory_mb < 64:
        raise ArgvError(f"vcpu={s.vcpu} memory_mb={s.memory_mb}: need >= 1 vCPU, >= 64 MiB")
    if s.mrconfigid is not None and (s.platform != "tdx" or len(s.mrconfigid) != 48):
        raise ArgvError("mrconfigid: 48 bytes, and only for platform 'tdx'")
    if s.platform == "tdx" and s.cid is None:
        raise ArgvError("cid: a TDX guest needs a vsock CID (attestation and host channel)")
    if s.network.mode == "bridge" and not s.network.bridge:
        raise ArgvError("network.bridge: bridge mode needs the name of a host bridge")
    for d in (s.rootfs, s.disk, s.data_disk):
        if d is not None and not all(c.isalnum() or c in "-_." for c in d.serial):
            raise ArgvError(f"disk serial {d.serial!r}: letters, digits, '-', '_', '.' only")
        if d is not None and len(d.serial) > 20:
            raise ArgvError(f"disk serial {d.serial!r}: at most 20 characters (virtio-blk)")
    if s.share is not None and s.share.mode == "virtiofs" and not s.share.virtiofs_socket:
        raise ArgvError("share.virtiofs_socket: virtiofs needs a running virtiofsd's socket")
    seen: set[tuple[str, str, int]] = set()
    for p in s.ports:
        key = (p.protocol, p.host_address, p.host_port)
        if key in seen:
            raise ArgvError(f"ports: {p.protocol} {p.host_address}:{p.host_port} mapped twice")
        seen.add(key)
        # Public addresses were the host's decision (the VMM checked its setting); here only
        # what QEMU's option parser must never see: anything but a protocol and an IP literal.
        bad = port_map_error(
            PortMap(protocol=p.protocol, host_address=p.host_address, host_port=p.host_port,
                    vm_port=p.vm_port),
            public_allowed=True,
        )  # fmt: skip
        if bad:
            raise ArgvError(f"ports: {bad}")


def _machine(s: QemuSpec) -> list[str]:
    if s.platform == "tcg":
        accel, cpu, machine = "tcg", "max", "q35,hpet=off"
    else:
        accel, cpu, machine = "kvm", "host", "q35,kernel-irqchip=split,hpet=off"
    if s.platform == "tdx":
        machine = "q35,kernel-irqchip=split,confidential-guest-support=tdx,hpet=off"
    if s.share is not None and s.share.mode == "virtiofs":
        machine += ",memory-backend=mem0"  # vhost-user needs shared guest memory
    args = ["-accel", accel, "-cpu", cpu, "-machine", machine]
    if s.platform == "tdx":
        args += ["-object", _tdx_object(s)]
    return args


def accel_args(platform: Platform) -> list[str]:
    """``-accel``, ``-cpu``, ``-machine`` (and the TDX object) as a CVM of ``platform`` gets them
    (the KVM probe guest of ``adapters.qemu.probe`` boots with exactly these)."""
    return _machine(QemuSpec(vm_id="probe", platform=platform, vcpu=1, memory_mb=64,
                             kernel="", initrd=""))  # fmt: skip


def _tdx_object(s: QemuSpec) -> str:
    # JSON always, as dstack's VMM (v0.5.11 qemu.rs serializes its TdxGuestObject with serde
    # whether or not a QGS port is set); the nested socket address needs it anyway.
    obj: dict[str, object] = {"qom-type": "tdx-guest", "id": "tdx"}
    if s.mrconfigid is not None:
        obj["mrconfigid"] = base64.b64encode(s.mrconfigid).decode()
    if s.qgs_port is not None:
        obj["quote-generation-socket"] = {"type": "vsock", "cid": "2", "port": str(s.qgs_port)}
    return json.dumps(obj, separators=(",", ":"))


def _disks(s: QemuSpec) -> list[str]:
    args: list[str] = []
    for drive_id, d in (("hd0", s.rootfs), ("hd1", s.disk), ("hd2", s.data_disk)):
        if d is None:
            continue
        ro = ",readonly=on" if d.readonly else ""
        serial = f",serial={_opt(d.serial)}" if d.serial else ""
        args += ["-drive", f"file={_opt(d.path)},if=none,id={drive_id},format={d.format}{ro}"]
        args += ["-device", f"virtio-blk-pci,drive={drive_id}{serial}"]
    return args


def _networking(s: QemuSpec) -> list[str]:
    n = s.network
    nic = f"virtio-net-pci,netdev=net0,mac={mac_address(s.vm_id, 0)}"
    if n.mode == "user":
        restrict = "on" if n.restrict else "off"
        netdev = f"user,id=net0,net={n.net},dhcpstart={n.dhcp_start},restrict={restrict}"
        return ["-netdev", netdev + _hostfwds(s.ports), "-device", nic]
    args = ["-netdev", f"bridge,id=net0,br={_opt(n.bridge)}", "-device", nic]
    if s.ports:
        fwd = f"user,id=fwd0,net={n.forward_net},dhcpstart={n.forward_dhcp_start},restrict=on"
        args += ["-netdev", fwd + _hostfwds(s.ports)]
        args += ["-device", f"virtio-net-pci,netdev=fwd0,mac={mac_address(s.vm_id, 1)}"]
    return args


def _channels(s: QemuSpec) -> list[str]:
    args: list[str] = []
    if s.cid is not None:
        args += ["-device", f"vhost-vsock-pci,guest-cid={s.cid}"]
    if s.events_log:
        args += [
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"file,id=events,path={_opt(s.events_log)},append=on",
            "-device", f"virtserialport,bus=vser0.0,chardev=events,name={EVENTS_PORT_NAME}",
        ]  # fmt: skip
    if s.qmp_socket:
        args += ["-qmp", f"unix:{_opt(s.qmp_socket)},server=on,wait=off"]
    if s.serial_log:
        args += ["-chardev", f"file,id=com0,path={_opt(s.serial_log)},append=on"]
        args += ["-serial", "chardev:com0"]
    return args


def _share(s: QemuSpec) -> list[str]:
    sh = s.share
    if sh is None:
        return []
    if sh.mode == "9p":
        ro = "on" if sh.readonly else "off"
        return ["-virtfs", f"local,path={_opt(sh.path)},mount_tag={SHARE_TAG},readonly={ro},"
                "security_model=mapped,id=virtfs0"]  # fmt: skip
    return [
        "-object", f"memory-backend-memfd,id=mem0,size={s.memory_mb}M,share=on",
        "-chardev", f"socket,id=vfs0,path={_opt(sh.virtiofs_socket)}",
        "-device", f"vhost-user-fs-pci,chardev=vfs0,tag={SHARE_TAG}",
    ]  # fmt: skip


def build_argv(spec: QemuSpec) -> list[str]:
    """The full command line (program first) for ``spec``; raises ``ArgvError`` when invalid.

    >>> build_argv(QemuSpec(vm_id="vm1", platform="tcg", vcpu=1, memory_mb=512,
    ...                     kernel="/img/bzImage", initrd="/img/initrd"))[:3]
    ['qemu-system-x86_64', '-name', 'vm1']
    """
    _validate(spec)
    args = [spec.qemu, "-name", spec.vm_id, "-nodefaults", "-display", "none"]
    args += _machine(spec)
    args += ["-smp", str(spec.vcpu), "-m", f"{spec.memory_mb}M"]
    if spec.bios:
        args += ["-bios", spec.bios]
    args += ["-kernel", spec.kernel, "-initrd", spec.initrd]
    if spec.cmdline:
        args += ["-append", spec.cmdline]
    args += _disks(spec) + _networking(spec) + _channels(spec) + _share(spec)
    return args
