"""The per-host VMM actor: CVM lifecycle projected from the log through a ``CvmBackend``,
with dstack's auto-restart policy and a dstack-shaped HTTP API (``/prpc/...``).

    async with running_vmm(store, VmmLaunch(config=VmmConfig(host_id="h1", state_dir=d))) as (
        vmm, api,   # api.url: "unix:<state_dir>/api/vmm.sock" (ApiEndpoints)
    ):
        ...

or as a process: ``python -m pydstack.actors.vmm --host-id h1 --state-dir D --backend sandbox``.
"""

from ._access import ApiEndpoints, ApiSetupError, serve_api
from ._actor import Vmm, VmmConfig
from ._api import make_api
from ._images import ImageEntry, list_backend_images
from ._info import vm_info
from ._main import VmmLaunch, build_backend, ensure_supervisor, resolve_platform, running_vmm

__all__ = [
    "ApiEndpoints", "ApiSetupError", "ImageEntry", "Vmm", "VmmConfig", "VmmLaunch",
    "build_backend", "ensure_supervisor", "list_backend_images", "make_api", "resolve_platform",
    "running_vmm", "serve_api", "vm_info",
]  # fmt: skip
