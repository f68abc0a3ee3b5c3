"""Image directories: metadata, and os_image_hash = sha256(sha256sum.txt) as dstack builds it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pydstack.adapters.qemu import Image, ImageError, list_images


def make_image(d: Path, **meta: object) -> Path:
    """An image directory made the way dstack's assemble.sh makes one (with coreutils)."""
    d.mkdir(parents=True)
    (d / "bzImage").write_bytes(b"kernel")
    (d / "initramfs.cpio.gz").write_bytes(b"initrd")
    (d / "rootfs.qcow2").write_bytes(b"disk")
    info = {"kernel": "bzImage", "initrd": "initramfs.cpio.gz", "hda": "rootfs.qcow2",
            "cmdline": "console=ttyS0", "version": "0.1.0", "future_field": 1, **meta}  # fmt: skip
    (d / "metadata.json").write_text(json.dumps(info))
    files = ["bzImage", "initramfs.cpio.gz", "rootfs.qcow2", "metadata.json"]
    sums = subprocess.run(["sha256sum", *files], cwd=d, capture_output=True, check=True).stdout
    (d / "sha256sum.txt").write_bytes(sums)
    digest = subprocess.run(["sha256sum", "sha256sum.txt"], cwd=d, capture_output=True, check=True)
    (d / "digest.txt").write_text(digest.stdout.decode().split()[0] + "\n")
    return d


def test_load_and_verify(tmp_path: Path) -> None:
    img = Image.load(make_image(tmp_path / "img"))
    img.verify()
    assert img.kernel == tmp_path / "img" / "bzImage" and img.rootfs is None
    assert img.info.cmdline == "console=ttyS0" and len(img.digest) == 64
    assert [i.name for i in list_images(tmp_path)] == ["img"]


def test_a_changed_artifact_fails_verification(tmp_path: Path) -> None:
    d = make_image(tmp_path / "img")
    (d / "rootfs.qcow2").write_bytes(b"tampered")
    with pytest.raises(ImageError, match=r"rootfs\.qcow2 has sha256"):
        Image.load(d).verify()


def test_a_digest_that_does_not_match_sha256sum_txt_fails(tmp_path: Path) -> None:
    d = make_image(tmp_path / "img")
    (d / "digest.txt").write_text("0" * 64)
    with pytest.raises(ImageError, match=r"is not sha256\(sha256sum.txt\)"):
        Image.load(d).verify()


def test_artifacts_must_exist_inside_the_image(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"'\.\./x' points outside"):
        Image.load(make_image(tmp_path / "a", hda="../x"))
    with pytest.raises(ImageError, match=r"bios 'ovmf\.fd' is missing"):
        Image.load(make_image(tmp_path / "b", bios="ovmf.fd"))
    with pytest.raises(ImageError, match=r"no metadata\.json"):
        Image.load(tmp_path / "nothing")


def test_a_linked_image_keeps_its_name_and_pins_the_build(tmp_path: Path) -> None:
    """make image points NAME at .store/NAME-<digest>: disks keep backing on that very build."""
    build = make_image(tmp_path / ".store" / "img-0123")
    (tmp_path / "img").symlink_to(".store/img-0123")
    img = Image.load(tmp_path / "img")
    assert img.name == "img" and img.hda == build / "rootfs.qcow2"
    assert [i.name for i in list_images(tmp_path)] == ["img"]
