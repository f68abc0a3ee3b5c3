"""A tiny QEMU guest image for tests: the host's Debian kernel and a busybox initramfs whose
``/init`` is a shell script of the test's. Under TCG it runs the script ~5 s after launch.

The Debian kernel has virtio-net as modules: the initramfs carries them and the script loads
them (``VIRTIO_NET``); eth0 then takes slirp's first lease statically (no DHCP client
script). Usage::

    images = build_image(tmp_path / "images", "probe", 'echo hello; poweroff -f')
    QemuBackend(QemuBackendConfig(vms_dir=..., images=images), sv)  # image "probe"
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "failover", "net_failover", "virtio_net")  # fmt: skip
APPLETS = ("sh", "mount", "insmod", "ip", "nc", "tftp", "timeout", "echo", "cat", "grep",
           "sleep", "poweroff", "wait", "kill", "true")  # fmt: skip

# Networking for a script: modules, loopback, eth0 at 10.0.2.10 (the backend's first lease,
# where port maps point) behind slirp's 10.0.2.2.
VIRTIO_NET = (
    "mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n"
    + "".join(f"insmod /lib/modules/{m}.ko\n" for m in MODULES)
    + "ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.10/24 dev eth0\n"
    + "ip route add default via 10.0.2.2\n"
)


def unavailable() -> str | None:
    """Why such a guest cannot be built here (None: it can)."""
    for tool in ("qemu-system-x86_64", "cpio", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} not found (make sysdeps)"
    if not _kernel():
        return "no /boot/vmlinuz-* with its modules (linux-image-amd64)"
    if not Path("/bin/busybox").exists():
        return "no /bin/busybox (busybox-static)"
    return None


def _kernel() -> tuple[Path, Path] | None:
    for k in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        mods = Path("/lib/modules") / k.name.removeprefix("vmlinuz-")
        if (mods / "kernel/drivers/net/virtio_net.ko").exists():
            return k, mods
    return None


def build_image(root: Path, name: str, script: str, *, net: bool = True) -> Path:
    """``root/name``: kernel, initramfs running ``script`` (after ``VIRTIO_NET`` when ``net``)
    as /init, a small qcow2 hda and metadata.json; returns ``root``."""
    found = _kernel()
    assert found is not None, unavailable()
    kernel, mods = found
    d = root / name
    tree = root / f".{name}-initramfs"
    for sub in ("bin", "proc", "sys", "dev", "tmp", "lib/modules"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", tree / "bin" / "busybox")
    for applet in APPLETS:  # not `busybox --install`: Debian's lists itself and loops
        (tree / "bin" / applet).symlink_to("busybox")
    for m in MODULES:
        [ko] = mods.glob(f"kernel/**/{m}.ko")
        shutil.copy2(ko, tree / "lib" / "modules" / ko.name)
    init = tree / "init"
    init.write_text("#!/bin/sh\nexport PATH=/bin\n" + (VIRTIO_NET if net else "") + script + "\n")
    init.chmod(0o755)
    names = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree, input=names,
                          capture_output=True, check=True).stdout  # fmt: skip
    d.mkdir(parents=True, exist_ok=True)
    (d / "initramfs.cpio.gz").write_bytes(gzip.compress(cpio, compresslevel=1))
    shutil.copy2(kernel, d / "bzImage")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "hda.qcow2"), "64M"],
                   check=True)  # fmt: skip
    meta = {"kernel": "bzImage", "initrd": "initramfs.cpio.gz", "hda": "hda.qcow2",
            "cmdline": "console=ttyS0 quiet panic=-1", "shared_ro": True}  # fmt: skip
    (d / "metadata.json").write_text(json.dumps(meta))
    shutil.rmtree(tree)
    return root
