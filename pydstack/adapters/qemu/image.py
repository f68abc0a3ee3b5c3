"""Guest images laid out like dstack's image directory, and their ``os_image_hash``.

An image directory holds ``metadata.json`` (dstack's ``ImageInfo``: kernel, initrd, hda or
rootfs, bios, cmdline, version...), the files it names, ``sha256sum.txt`` (``sha256sum`` lines
of the boot artifacts) and ``digest.txt``. dstack's rule, kept here:
``os_image_hash = digest.txt = sha256(bytes of sha256sum.txt)``. ``verify`` checks both levels.

Usage::

    img = Image.load(images_dir() / "pydstack-dev")
    img.verify()                  # raises ImageError on any mismatch
    img.kernel, img.initrd, img.hda, img.info.cmdline, img.digest
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgspec

from pydstack.core.events import ImageRegistered


class ImageError(Exception):
    """An image directory is incomplete or does not match its digests."""


class ImageInfo(msgspec.Struct, frozen=True, kw_only=True, rename={"bios_sev": "bios-sev"}):
    """``metadata.json``; unknown fields are kept out, as dstack's loader does."""

    kernel: str
    initrd: str
    cmdline: str | None = None
    hda: str | None = None  # qcow2 a VM's disk is created on (backing file)
    rootfs: str | None = None  # read-only root (verity/iso in dstack)
    bios: str | None = None
    bios_sev: str | None = None
    rootfs_hash: str | None = None
    shared_ro: bool = False
    version: str = ""
    is_dev: bool = False


def images_dir() -> Path:
    """Where built images live: ``$PYDSTACK_IMAGE_CACHE`` or ``~/.cache/pydstack/images``."""
    env = os.environ.get("PYDSTACK_IMAGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pydstack" / "images"


def file_hex(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file, read in chunks (images are hundreds of MB)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


NO_BIOS = hashlib.sha384(b"pydstack: QEMU's default firmware").hexdigest()


def image_registration(image: Image) -> ImageRegistered:
    """What ``pydstack image register`` puts on the log for this image: its dstack
    ``os_image_hash`` with the ``sha256sum.txt`` it is the hash of, and the sha384 of the
    files the measurements depend on (firmware, kernel, initrd) and the command line."""
    sums_file = image.dir / "sha256sum.txt"
    sums = sums_file.read_text() if sums_file.exists() else ""
    return ImageRegistered(
        os_image_hash=image.digest or os_image_hash(sums.encode()), name=image.name,
        version=image.info.version, sha256sum=sums,
        firmware=file_hex(image.bios, "sha384") if image.bios else NO_BIOS,
        kernel=file_hex(image.kernel, "sha384"), initrd=file_hex(image.initrd, "sha384"),
        cmdline=image.info.cmdline or "",
    )  # fmt: skip


def os_image_hash(sha256sum_txt: bytes) -> str:
    """dstack's ``os_image_hash``: sha256 of the exact bytes of ``sha256sum.txt``."""
    return hashlib.sha256(sha256sum_txt).hexdigest()


class Image(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # the name it was loaded by (the link's name when ``dir`` is a link)
    dir: Path
    info: ImageInfo
    kernel: Path
    initrd: Path
    hda: Path | None
    rootfs: Path | None
    bios: Path | None
    digest: str  # digest.txt, "" when absent

    @classmethod
    def load(cls, directory: Path) -> Image:
        """Load ``directory``; a symlink is followed, so artifact paths name the very build
        (a disk backed by it stays valid when the name moves to a newer build)."""
        d = directory.resolve()
        meta = d / "metadata.json"
        try:
            info = msgspec.json.decode(meta.read_bytes(), type=ImageInfo)
        except FileNotFoundError:
            raise ImageError(f"{d} is not an image: no metadata.json (make image)") from None
        except msgspec.DecodeError as e:
            raise ImageError(f"{meta}: {e}") from None

        def artifact(name: str | None, what: str) -> Path | None:
            if name is None:
                return None
            p = (d / name).resolve()
            if p.parent != d:
                raise ImageError(f"{meta}: {what} {name!r} points outside the image directory")
            if not p.is_file():
                raise ImageError(f"{d}: {what} {name!r} is missing")
            return p

        kernel, initrd = artifact(info.kernel, "kernel"), artifact(info.initrd, "initrd")
        assert kernel is not None and initrd is not None
        digest_file = d / "digest.txt"
        return cls(
            name=directory.name,
            dir=d,
            info=info,
            kernel=kernel,
            initrd=initrd,
            hda=artifact(info.hda, "hda"),
            rootfs=artifact(info.rootfs, "rootfs"),
            bios=artifact(info.bios, "bios"),
            digest=digest_file.read_text().strip() if digest_file.exists() else "",
        )

    def verify(self) -> None:
        """Check every ``sha256sum.txt`` line against its file and ``digest.txt`` against it."""
        sums_file = self.dir / "sha256sum.txt"
        if not sums_file.exists():
            raise ImageError(f"{self.dir}: no sha256sum.txt, the image cannot be verified")
        sums = sums_file.read_bytes()
        if os_image_hash(sums) != self.digest:
            raise ImageError(
                f"{self.dir}: digest.txt ({self.digest or 'missing'}) is not "
                f"sha256(sha256sum.txt) ({os_image_hash(sums)})"
            )
        listed: set[str] = set()
        for line in sums.decode().splitlines():
            want, _, name = line.partition("  ")
            listed.add(name)
            got = file_hex(self.dir / name) if (self.dir / name).is_file() else "missing"
            if got != want:
                raise ImageError(f"{self.dir}: {name} has sha256 {got}, sha256sum.txt says {want}")
        needed = {p.name for p in (self.kernel, self.initrd, self.hda, self.rootfs) if p}
        if missing := needed - listed:
            raise ImageError(f"{self.dir}: {sorted(missing)} not covered by sha256sum.txt")


def list_images(directory: Path | None = None) -> list[Image]:
    """Every loadable image under ``directory`` (default ``images_dir()``), by name."""
    root = directory or images_dir()
    found: list[Image] = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / "metadata.json").exists():
                try:
                    found.append(Image.load(d))
                except ImageError:
                    continue
    return found
