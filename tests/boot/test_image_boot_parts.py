"""The host-side and pure parts of the QEMU guest's boot flow, without booting a guest
(tests/boot/test_qemu_deploy.py boots one): what the QEMU backend puts in the host share for a
simulated TD, and how the guest dials a gateway's WireGuard endpoint through slirp."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from pydstack.adapters.qemu import Image
from pydstack.adapters.qemu.backend import write_simulated_td
from pydstack.adapters.qemu.image import NO_BIOS
from pydstack.adapters.sandbox import build_busybox_image
from pydstack.adapters.tdx.pki import DevPki
from pydstack_guest.image_boot import reach


def _image(root: Path) -> Image:
    d = root / "img"
    d.mkdir()
    for name in ("bzImage", "initrd"):
        (d / name).write_bytes(b"x")
    (d / "metadata.json").write_text(json.dumps({"kernel": "bzImage", "initrd": "initrd"}))
    (d / "digest.txt").write_text("ab" * 32 + "\n")
    return Image.load(d)


def test_host_share_of_a_simulated_td(tmp_path: Path) -> None:
    """dev-pki/ is the PKI the KMS trusts (same root), each sandbox image is copied whole, and
    dev-td.json names the booted image's digest, those images and the digests the simulated TD
    is measured from; a second create replaces
    them (no stale PKI)."""
    if not shutil.which("busybox"):
        pytest.skip("busybox-static not installed")
    pki_dir, images, shared = tmp_path / "pki", tmp_path / "app-images", tmp_path / "shared"
    DevPki.generate().save(pki_dir)
    build_busybox_image(images)
    shared.mkdir()
    (shared / "dev-pki").mkdir()
    (shared / "dev-pki" / "stale.der").write_bytes(b"old")
    write_simulated_td(shared, _image(tmp_path), pki_dir, images)
    assert (shared / "dev-pki" / "root.der").read_bytes() == (pki_dir / "root.der").read_bytes()
    assert not (shared / "dev-pki" / "stale.der").exists()
    tar = images / "sandbox-busybox" / "rootfs.tar"
    assert (shared / "images" / "sandbox-busybox" / "rootfs.tar").read_bytes() == tar.read_bytes()
    doc = json.loads((shared / "dev-td.json").read_text())
    x = hashlib.sha384(b"x").hexdigest()  # the kernel and initrd files are b"x"
    parts = {"firmware": NO_BIOS, "kernel": x, "initrd": x, "cmdline": ""}  # no bios: QEMU's own
    assert doc == {"os_image_hash": "ab" * 32, "images": ["sandbox-busybox"], "image": parts}


async def test_wireguard_endpoint_on_the_host_loopback_is_dialled_at_slirps_host_alias() -> None:
    assert await reach("127.0.0.1:51820") == "10.0.2.2:51820"
    assert await reach("localhost:7") == "10.0.2.2:7"
    assert await reach("10.9.8.7:51820") == "10.9.8.7:51820"  # another host: through the NAT
    with pytest.raises(ValueError, match="not host:port"):
        await reach("127.0.0.1")
