"""The QEMU backend against the same contract (TCG here), on the image of `make image` (built
first when missing or stale; a host that cannot build it fails, never skips). Three guest boots,
~45 s in all on these machines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pydstack.adapters.cvm import CvmSpec
from pydstack.adapters.qemu import QemuBackend, QemuBackendConfig
from pydstack.core.events import PortMap
from tests.qemu.guest_image import IMAGE, built_image, images_root

from .contract import CvmBackendContract, Host

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


class TestQemuContract(CvmBackendContract):
    BOOT_TIMEOUT_S = 240.0
    HTTP_PORT = 8080  # the image's guest-boot service answers here once "ready"

    @pytest.fixture
    async def host(self, tmp_path: Path) -> AsyncIterator[Host]:
        built_image()
        cfg = QemuBackendConfig(vms_dir=tmp_path / "vms", images=images_root(), vsock=False)
        h = Host(tmp_path, lambda sv: QemuBackend(cfg, sv))
        yield h
        await h.close()

    def spec(self, vm_id: str, *, cid: int, ports: tuple[PortMap, ...] = ()) -> CvmSpec:
        return CvmSpec(vm_id=vm_id, image=IMAGE, vcpu=2, memory_mb=1536, cid=cid, ports=ports,
                       app_compose=b'{"name":"contract"}')  # fmt: skip
