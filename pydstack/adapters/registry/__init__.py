"""An OCI image registry for CVMs that reach no public one: Debian's ``docker-registry``
(distribution 2.8) run on a loopback port (`LocalRegistry`), and a push client that makes a
one-layer image from a root filesystem and uploads it over the registry API (`push_rootfs`),
with no docker engine on the host::

    async with LocalRegistry.start(data / "registry") as reg:     # reg.url: http://127.0.0.1:P
        pushed = await push_rootfs(reg.url, "busybox:latest", rootfs_tar)
        pushed.pinned   # busybox@sha256:...: what a compose file names to pin the content
"""

from ._push import Pushed, PushError, image_from_rootfs, push_rootfs, repository
from ._server import LocalRegistry, RegistryError

__all__ = ["LocalRegistry", "PushError", "Pushed", "RegistryError", "image_from_rootfs",
           "push_rootfs", "repository"]  # fmt: skip
