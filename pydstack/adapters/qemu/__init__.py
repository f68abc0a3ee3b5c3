"""QEMU adapter: pure argv builder, QMP control, qemu-img disks, guest images, CVM backend."""

from .argv import (
    ArgvError,
    Disk,
    HostShare,
    Network,
    Platform,
    PortForward,
    QemuSpec,
    build_argv,
    mrconfigid_for_compose,
    mrconfigid_v1,
)
from .backend import QemuBackend, QemuBackendConfig
from .disk import DiskError, DiskInfo
from .image import Image, ImageError, ImageInfo, images_dir, list_images, os_image_hash
from .qmp import Qmp, QmpError

__all__ = [
    "ArgvError",
    "Disk",
    "DiskError",
    "DiskInfo",
    "HostShare",
    "Image",
    "ImageError",
    "ImageInfo",
    "Network",
    "Platform",
    "PortForward",
    "QemuBackend",
    "QemuBackendConfig",
    "QemuSpec",
    "Qmp",
    "QmpError",
    "build_argv",
    "images_dir",
    "list_images",
    "mrconfigid_for_compose",
    "mrconfigid_v1",
    "os_image_hash",
]  # fmt: skip
