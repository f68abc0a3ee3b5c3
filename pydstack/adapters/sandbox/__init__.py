"""The ``sandbox`` CVM backend: a network namespace with its own docker engine and the guest
agent on the simulated TDX backend, behind the same ``CvmBackend`` port as QEMU."""

from .backend import SandboxBackend, SandboxConfig
from .images import SandboxImage, build_busybox_image, list_images, load_image

__all__ = [
    "SandboxBackend", "SandboxConfig", "SandboxImage", "build_busybox_image", "list_images",
    "load_image",
]  # fmt: skip
