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


def test_the_hosts_registry_mirror_reaches_the_guests_engine_config(tmp_path: Path) -> None:
    """sys-config's docker_registry (the host's first registry mirror, `up --registry`)
    becomes the guest engine's registry-mirrors before docker.service starts; none named:
    no config file."""
    from pydstack_guest.image_boot import registry_mirror, write_docker_config

    mirror = registry_mirror({"docker_registry": "http://127.0.0.1:5000"})
    write_docker_config(mirror, tmp_path / "docker" / "daemon.json")
    doc = json.loads((tmp_path / "docker" / "daemon.json").read_text())
    assert doc == {"registry-mirrors": ["http://127.0.0.1:5000"]}
    for none in ({}, {"docker_registry": None}, {"docker_registry": ""}):
        assert registry_mirror(none) == ""
    write_docker_config("", tmp_path / "other.json")
    assert not (tmp_path / "other.json").exists()


@pytest.mark.parametrize("url", [
    "ftp://127.0.0.1:5000", "http://user:pw@127.0.0.1:5000", "http://127.0.0.1:5000/?q=1",
    "http://", "http://127.0.0.1:5000/\nx", "https://" + "a" * 600 + ".example", 5000,
    ["http://127.0.0.1:5000"],
])  # fmt: skip
def test_a_hostile_registry_mirror_stops_the_boot_naming_it(url: object) -> None:
    """The host names the mirror: anything but a plain http(s) URL is refused by name
    before the engine could be pointed at it."""
    from pydstack_guest.boot import BootFailed
    from pydstack_guest.image_boot import registry_mirror

    with pytest.raises(BootFailed, match="docker_registry"):
        registry_mirror({"docker_registry": url})


def test_the_vmm_names_its_first_registry_mirror_in_sys_config() -> None:
    """build_spec writes the host's mirror as dstack's docker_registry (null without one)."""
    from pydstack.actors.vmm._workdir import build_spec
    from pydstack.core.events import VmRequested, VmResources
    from pydstack.core.projections import Applied
    from pydstack.core.vmm import record

    req = VmRequested(vm_id="v1", app_id="ab" * 20, name="w", image="img", compose=b"{}",
                      resources=VmResources(vcpu=1, memory_mb=256))  # fmt: skip
    rec = record.apply(None, Applied(seq=1, id="e1", event=req, time_ns=1))
    assert rec is not None
    for given, want in (("http://127.0.0.1:5000", "http://127.0.0.1:5000"), ("", None)):
        spec = build_spec(rec, {}, docker_registry=given)
        assert json.loads(spec.shared_files[".sys-config.json"])["docker_registry"] == want
