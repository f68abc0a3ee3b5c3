"""Sandbox images: a directory per image with ``metadata.json`` and a root filesystem tarball
that each CVM's docker engine imports under the names the metadata lists (no registry here).

    <images>/<name>/metadata.json   {"version", "description", "docker_images": ["busybox:latest"]}
    <images>/<name>/rootfs.tar      e.g. busybox-static (build_busybox_image)
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import msgspec

from pydstack.adapters.qemu.image import file_hex
from pydstack.core.events import ImageRegistered
from pydstack.core.vmm.image_name import image_name_error


class ImageNameError(ValueError):
    """An image name that is not one safe path component (``../x``, ``/etc``, empty...)."""


class SandboxImage(msgspec.Struct, frozen=True, kw_only=True):
    name: str = ""
    version: str = ""
    description: str = ""
    docker_images: tuple[str, ...] = ("busybox:latest",)
    rootfs: str = "rootfs.tar"
    is_dev: bool = True


def load_image(root: Path, name: str) -> SandboxImage:
    """``<root>/<name>``'s metadata; ``name`` may come from the log or the host share, so it is
    checked before the join (``ImageNameError``)."""
    if (reason := image_name_error(name)) is not None:
        raise ImageNameError(reason)
    path = root / name / "metadata.json"
    img = msgspec.json.decode(path.read_bytes(), type=SandboxImage)
    return msgspec.structs.replace(img, name=name)


def list_images(root: Path) -> list[SandboxImage]:
    if not root.is_dir():
        return []
    return [
        load_image(root, d.name)
        for d in sorted(root.iterdir())
        if image_name_error(d.name) is None and (d / "metadata.json").is_file()
    ]


def build_busybox_image(root: Path, name: str = "sandbox-busybox") -> SandboxImage:
    """A ~2 MB image from the host's busybox-static: /bin/busybox plus its applet links."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise FileNotFoundError("busybox not found: apt-get install busybox-static")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for sub in ("bin", "tmp", "etc", "var", "var/run", "proc", "sys", "dev", "www"):
            info = tarfile.TarInfo(sub)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if sub == "tmp" else 0o755
            tar.addfile(info)
        tar.add(os.path.realpath(busybox), arcname="bin/busybox")
        page = b"<h1>pydstack sandbox</h1>\n"
        info = tarfile.TarInfo("www/index.html")
        info.size, info.mode = len(page), 0o644
        tar.addfile(info, io.BytesIO(page))
        for applet in applets.stdout.split():
            if applet == "busybox":
                continue  # a link to itself would replace the binary (Debian lists it)
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    (d / "rootfs.tar").write_bytes(buf.getvalue())
    meta = SandboxImage(version="1", description="busybox-static rootfs (sandbox backend)")
    (d / "metadata.json").write_bytes(msgspec.json.encode(meta))
    return msgspec.structs.replace(meta, name=name)


def image_registration(root: Path, name: str) -> ImageRegistered:
    """What ``pydstack image register`` puts on the log for a sandbox image.

    A sandbox CVM runs on the host's kernel with no firmware, so its simulated measurements
    bind the image's content instead: ``initrd`` is the sha384 of its ``sha256sum.txt``
    (``metadata.json`` and the rootfs tarball), whose sha256 is the ``os_image_hash``, as in
    dstack's image directories."""
    img = load_image(root, name)
    if img.rootfs in ("", ".", "..") or "/" in img.rootfs:
        raise ImageNameError(f"image {name}: rootfs {img.rootfs!r} is not a file name")
    d = root / name
    sums = "".join(f"{file_hex(d / f)}  {f}\n" for f in sorted({"metadata.json", img.rootfs}))
    return ImageRegistered(
        os_image_hash=hashlib.sha256(sums.encode()).hexdigest(), name=name,
        version=img.version, sha256sum=sums,
        firmware=hashlib.sha384(b"pydstack sandbox: no firmware").hexdigest(),
        kernel=hashlib.sha384(b"pydstack sandbox: the host's kernel").hexdigest(),
        initrd=hashlib.sha384(sums.encode()).hexdigest(),
    )  # fmt: skip
