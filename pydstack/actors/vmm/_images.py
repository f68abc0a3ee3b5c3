"""Guest images a backend can run (dstack's ListImages), whatever the backend."""

from __future__ import annotations

from pathlib import Path

import msgspec

from pydstack.adapters.cvm import CvmBackend


class ImageEntry(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str = ""
    version: str = ""
    is_dev: bool = False


def list_backend_images(backend: CvmBackend, qemu_images: Path | None = None) -> list[ImageEntry]:
    if backend.kind == "sandbox":
        from pydstack.adapters.sandbox import SandboxBackend

        assert isinstance(backend, SandboxBackend)
        return [ImageEntry(name=i.name, description=i.description, version=i.version,
                           is_dev=i.is_dev) for i in backend.images()]  # fmt: skip
    from pydstack.adapters.qemu import QemuBackend, images_dir, list_images

    root = qemu_images
    if isinstance(backend, QemuBackend):
        root = backend.config.images or images_dir()
    out = []
    for img in list_images(root or images_dir()):
        info = img.info
        out.append(ImageEntry(name=img.name, version=str(getattr(info, "version", "")),
                              description=str(getattr(info, "description", "")),
                              is_dev=bool(getattr(info, "is_dev", False))))  # fmt: skip
    return out


def log_file(backend: CvmBackend, vm_id: str) -> Path | None:
    """The CVM's console log (the port has no logs verb; both backends keep one)."""
    path = getattr(backend, "log_path", None)
    if callable(path):
        p = path(vm_id)
        return p if isinstance(p, Path) else None
    workdir = getattr(backend, "workdir", None)
    if callable(workdir):
        wd = workdir(vm_id)
        return wd / "serial.log" if isinstance(wd, Path) else None
    return None
