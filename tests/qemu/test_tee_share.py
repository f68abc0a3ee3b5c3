"""What the QEMU backend tells a guest about its TEE through the host share
(`pydstack.adapters.qemu.backend.write_tee_share`): its platform always; the simulated TD,
with the dev PKI's private keys, only for a platform with no TEE. A TDX VM's share never
holds them, also when the VM was created while the host still ran TCG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pydstack.adapters.cvm import CvmSpec
from pydstack.adapters.qemu import Image, QemuBackendConfig
from pydstack.adapters.qemu.argv import Platform
from pydstack.adapters.qemu.backend import QemuBackend, write_tee_share
from pydstack.adapters.tdx.pki import DevPki

from .conftest import Host

DIGEST = "cd" * 32


@pytest.fixture
def dev_pki(tmp_path: Path) -> Path:
    DevPki.generate().save(tmp_path / "dev-pki")
    return tmp_path / "dev-pki"


@pytest.fixture
def image(tmp_path: Path) -> Image:
    d = tmp_path / "images" / "tiny"
    d.mkdir(parents=True)
    (d / "bzImage").write_bytes(b"k")
    (d / "initramfs.cpio.gz").write_bytes(b"i")
    (d / "digest.txt").write_text(DIGEST + "\n")
    (d / "metadata.json").write_text(json.dumps({"kernel": "bzImage",
                                                 "initrd": "initramfs.cpio.gz"}))  # fmt: skip
    return Image.load(d)


def secrets_of(pki_dir: Path) -> list[bytes]:
    """Every file's bytes in the dev PKI (its private keys among them)."""
    return [p.read_bytes() for p in sorted(pki_dir.rglob("*")) if p.is_file()]


def holds_any(share: Path, blobs: list[bytes]) -> bool:
    return any(b in p.read_bytes() for p in share.rglob("*") if p.is_file() for b in blobs)


@pytest.mark.parametrize("platform", ["tcg", "kvm"])
def test_a_platform_with_no_tee_gets_the_simulated_td(
    tmp_path: Path, image: Image, dev_pki: Path, platform: Platform
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    write_tee_share(share, platform, image, dev_pki, None)
    assert json.loads((share / "platform.json").read_text()) == {
        "platform": platform, "os_image_hash": DIGEST}  # fmt: skip
    assert (share / "dev-pki" / "root.der").read_bytes() == (dev_pki / "root.der").read_bytes()
    assert (share / "dev-td.json").is_file()


def test_a_tdx_vm_never_gets_the_dev_pki(tmp_path: Path, image: Image, dev_pki: Path) -> None:
    """The share was a TCG VM's (dev PKI, dev-td.json, images); at its next start on a TDX
    host every simulated-TD file is gone and no byte of the dev PKI is left in the share."""
    share = tmp_path / "share"
    share.mkdir()
    write_tee_share(share, "tcg", image, dev_pki, None)
    (share / "images" / "sandbox-busybox").mkdir(parents=True)
    assert holds_any(share, secrets_of(dev_pki))
    write_tee_share(share, "tdx", image, dev_pki, None)
    assert json.loads((share / "platform.json").read_text())["platform"] == "tdx"
    assert sorted(p.name for p in share.iterdir()) == ["platform.json"]
    assert not holds_any(share, secrets_of(dev_pki))


def test_a_simulated_platform_without_a_dev_pki_gets_none(
    tmp_path: Path, image: Image, dev_pki: Path
) -> None:
    """A VMM restarted without --dev-pki leaves no stale PKI behind (the guest then fails at
    ``tee`` naming the missing dev-td.json, instead of signing with an old PKI)."""
    share = tmp_path / "share"
    share.mkdir()
    write_tee_share(share, "tcg", image, dev_pki, None)
    write_tee_share(share, "tcg", image, None, None)
    assert sorted(p.name for p in share.iterdir()) == ["platform.json"]


async def test_create_on_a_tdx_host_with_a_dev_pki_configured(
    host: Host, tmp_path: Path, image: Image, dev_pki: Path
) -> None:
    """`up --dev-pki` on a TDX host: the backend is given the PKI, the TDX VM's share does
    not get it. (`start` refreshes the share the same way: the TCG-to-TDX test above.)"""
    await host.start(image.dir.parent)  # the supervisor the backend needs
    assert host.client is not None
    cfg = QemuBackendConfig(vms_dir=host.root / "vms", images=image.dir.parent, vsock=False,
                            platform="tdx", dev_pki=dev_pki)  # fmt: skip
    tdx = QemuBackend(cfg, host.client)
    spec = CvmSpec(vm_id="vm1", image="tiny", vcpu=1, memory_mb=256,
                   app_compose=b'{"manifest_version":2,"name":"t"}')  # fmt: skip
    await tdx.create(spec)
    share = host.root / "vms" / "vm1" / "shared"
    assert json.loads((share / "platform.json").read_text())["platform"] == "tdx"
    assert not (share / "dev-pki").exists() and not (share / "dev-td.json").exists()
    assert not holds_any(share, secrets_of(dev_pki))
