"""QEMU command lines: golden files for representative CVMs, and the rules behind them.

Regenerate the golden files after an intended change with
``PYDSTACK_REGEN_GOLDEN=1 pytest tests/qemu/test_argv.py`` and review the diff.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest

from pydstack.adapters.qemu import (
    ArgvError,
    Disk,
    HostShare,
    Network,
    PortForward,
    QemuSpec,
    build_argv,
    mrconfigid_for_compose,
)
from pydstack.adapters.qemu.argv import accel_args
from pydstack.adapters.tdx.identity import mr_config_id_v1

GOLDEN = Path(__file__).parent / "golden"
COMPOSE = b'{"manifest_version":2,"name":"demo","runner":"docker-compose"}'
W = "/var/lib/pydstack/vms/vm-1"
PORTS = (
    PortForward(host_port=18080, vm_port=80),
    PortForward(protocol="udp", host_address="0.0.0.0", host_port=15353, vm_port=53),
)


def _base(**kw: object) -> QemuSpec:
    spec: dict[str, object] = dict(
        vm_id="vm-1", platform="tdx", vcpu=4, memory_mb=4096,
        kernel="/images/dstack-0.5.4/bzImage", initrd="/images/dstack-0.5.4/initramfs.cpio.gz",
        cmdline="console=ttyS0 init=/init panic=1", bios="/images/dstack-0.5.4/ovmf.fd",
        rootfs=Disk(path="/images/dstack-0.5.4/rootfs.img.verity", format="raw", readonly=True),
        disk=Disk(path=f"{W}/hda.img"), cid=1000, share=HostShare(path=f"{W}/shared"),
        ports=PORTS, mrconfigid=mrconfigid_for_compose(COMPOSE),
        qmp_socket=f"{W}/qmp.sock", serial_log=f"{W}/serial.log", events_log=f"{W}/events.log",
    )  # fmt: skip
    spec.update(kw)
    return QemuSpec(**spec)  # type: ignore[arg-type]


CASES = {
    "tdx_user": _base(),
    "tdx_bridge_qgs": _base(network=Network(mode="bridge", bridge="virbr0"), qgs_port=4050),
    "tcg_user": _base(
        platform="tcg",
        bios="",
        rootfs=None,
        cid=None,
        mrconfigid=None,
        vcpu=2,
        memory_mb=2048,
        disk=Disk(path=f"{W}/disk.qcow2"),
        share=HostShare(path=f"{W}/shared", readonly=False),
    ),
    "kvm_virtiofs_noports": _base(
        platform="kvm",
        mrconfigid=None,
        ports=(),
        network=Network(restrict=True),
        share=HostShare(path=f"{W}/shared", mode="virtiofs", virtiofs_socket=f"{W}/vfs.sock"),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_argv_matches_golden(name: str) -> None:
    """Each representative CVM builds exactly the reviewed command line."""
    argv = build_argv(CASES[name])
    path = GOLDEN / f"{name}.argv"
    if os.environ.get("PYDSTACK_REGEN_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text("\n".join(argv) + "\n")
    assert argv == path.read_text().splitlines()


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_mrconfigid_is_dstack_v1_of_the_compose_hash() -> None:
    """mrconfigid = base64(0x01 || sha256(app-compose.json) || 15 zero bytes), as dstack's VMM."""
    (obj,) = [o for o in _after(build_argv(_base()), "-object") if "tdx-guest" in o]
    value = base64.b64decode(json.loads(obj)["mrconfigid"])
    compose_hash = hashlib.sha256(COMPOSE).digest()
    assert value == b"\x01" + compose_hash + b"\x00" * 15
    assert value == mr_config_id_v1(compose_hash)  # the verifier's side computes the same


def test_qgs_socket_switches_the_tdx_object_to_json() -> None:
    objs = _after(build_argv(_base(qgs_port=4050)), "-object")
    obj = json.loads(objs[0])
    assert obj["quote-generation-socket"] == {"type": "vsock", "cid": "2", "port": "4050"}
    assert base64.b64decode(obj["mrconfigid"]) == mrconfigid_for_compose(COMPOSE)


def test_port_maps_survive_bridge_mode() -> None:
    """dstack #1155: bridge mode must not drop port maps; a restricted user NIC carries them."""
    argv = build_argv(_base(network=Network(mode="bridge", bridge="br0")))
    netdevs = _after(argv, "-netdev")
    assert netdevs[0] == "bridge,id=net0,br=br0"
    assert netdevs[1].startswith("user,id=fwd0,") and "restrict=on" in netdevs[1]
    assert "hostfwd=tcp:127.0.0.1:18080-:80" in netdevs[1]
    assert "hostfwd=udp:0.0.0.0:15353-:53" in netdevs[1]
    nics = [d for d in _after(argv, "-device") if d.startswith("virtio-net-pci")]
    assert len(nics) == 2 and nics[0] != nics[1]


def test_bridge_without_ports_has_a_single_nic() -> None:
    argv = build_argv(_base(network=Network(mode="bridge", bridge="br0"), ports=()))
    assert _after(argv, "-netdev") == ["bridge,id=net0,br=br0"]


def test_tcg_guest_has_no_tee_and_no_vsock_without_a_cid() -> None:
    argv = build_argv(CASES["tcg_user"])
    assert _after(argv, "-accel") == ["tcg"] and "-object" not in argv
    assert not any("vhost-vsock" in a for a in argv)
    assert "confidential-guest-support" not in " ".join(argv)
    # the host still hears from the guest: virtio-serial port backed by a file
    assert f"file,id=events,path={W}/events.log,append=on" in _after(argv, "-chardev")


def test_commas_in_paths_are_escaped() -> None:
    argv = build_argv(_base(disk=Disk(path="/vms/a,b/disk.qcow2")))
    assert "file=/vms/a,,b/disk.qcow2,if=none,id=hd1,format=qcow2" in _after(argv, "-drive")


def test_the_data_disk_is_a_third_virtio_disk_the_guest_finds_by_serial() -> None:
    """pydstack_guest.data_disk looks for /sys/block/vd*/serial == "pydstack-data"."""
    argv = build_argv(_base(data_disk=Disk(path=f"{W}/data.qcow2", serial="pydstack-data")))
    assert f"file={W}/data.qcow2,if=none,id=hd2,format=qcow2" in _after(argv, "-drive")
    assert "virtio-blk-pci,drive=hd2,serial=pydstack-data" in _after(argv, "-device")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cid": None}, "cid"),
        ({"platform": "tcg"}, "mrconfigid"),
        ({"network": Network(mode="bridge")}, "network.bridge"),
        ({"ports": (PORTS[0], PORTS[0])}, "ports"),
        ({"ports": (PortForward(host_port=0, vm_port=80),)}, "ports"),
        ({"vm_id": "a,b"}, "vm_id"),
        ({"share": HostShare(path="/x", mode="virtiofs")}, "share.virtiofs_socket"),
        ({"mrconfigid": b"\x01" * 47}, "mrconfigid"),
        ({"data_disk": Disk(path="/d", serial="a,b")}, "disk serial"),
        ({"data_disk": Disk(path="/d", serial="x" * 21)}, "disk serial"),
    ],
)
def test_invalid_specs_are_refused_naming_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(ArgvError, match=f"^{field}"):
        build_argv(_base(**change))


def test_tdx_machine_and_object_are_dstack_vmm_v0_5_11s() -> None:
    """dstack v0.5.11 (vmm/src/app/qemu.rs): -accel kvm -cpu host, the TDX machine, and the
    tdx-guest object serialized by serde in field order, with its default QGS port 4050."""
    argv = build_argv(_base(qgs_port=4050))
    assert _after(argv, "-accel") == ["kvm"] and _after(argv, "-cpu") == ["host"]
    assert _after(argv, "-machine") == [
        "q35,kernel-irqchip=split,confidential-guest-support=tdx,hpet=off"
    ]
    mr = base64.b64encode(mrconfigid_for_compose(COMPOSE)).decode()
    assert _after(argv, "-object") == [
        '{"qom-type":"tdx-guest","id":"tdx","mrconfigid":"' + mr + '",'
        '"quote-generation-socket":{"type":"vsock","cid":"2","port":"4050"}}'
    ]
    # without mrconfigid (image < 0.5.2) nor QGS, still JSON: serde skips the None fields
    bare = build_argv(_base(mrconfigid=None))
    assert _after(bare, "-object") == ['{"qom-type":"tdx-guest","id":"tdx"}']


@pytest.mark.parametrize("platform", ["tdx", "kvm", "tcg"])
def test_each_platform_gets_its_accelerator_cpu_and_machine(platform: str) -> None:
    """The golden cases cover each platform; accel_args (the KVM probe's) is what they use."""
    case = {"tdx": "tdx_user", "kvm": "kvm_virtiofs_noports", "tcg": "tcg_user"}[platform]
    golden = (GOLDEN / f"{case}.argv").read_text().splitlines()
    accel = accel_args(platform)  # type: ignore[arg-type]  # one of the three
    at = golden.index("-accel")
    assert golden[at : at + 5] == accel[:5]  # -accel X -cpu Y -machine
    assert golden[at + 5].startswith(accel[5])  # (+ memory-backend=mem0 with virtiofs)
    if platform == "tdx":
        assert accel[-2] == "-object" and json.loads(accel[-1])["qom-type"] == "tdx-guest"
