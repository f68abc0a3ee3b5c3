"""The QEMU backend against the same contract (TCG here). Opt-in: each boot takes 30-80 s on
these machines, so it runs only with PYDSTACK_QEMU_CONTRACT=1 and a built image (make image)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pydstack.adapters.cvm import CvmSpec
from pydstack.adapters.qemu import QemuBackend, QemuBackendConfig, images_dir
from pydstack.core.events import PortMap

from .contract import CvmBackendContract, Host

IMAGE = "pydstack-dev"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(
        os.environ.get("PYDSTACK_QEMU_CONTRACT") != "1"
        or not (images_dir() / IMAGE / "metadata.json").exists(),
        reason="set PYDSTACK_QEMU_CONTRACT=1 with a built image (make image) to run",
    ),
]


class TestQemuContract(CvmBackendContract):
    BOOT_TIMEOUT_S = 240.0
    HTTP_PORT = 8080  # the image's guest-boot service answers here once "ready"

    @pytest.fixture
    async def host(self, tmp_path: Path) -> AsyncIterator[Host]:
        cfg = QemuBackendConfig(vms_dir=tmp_path / "vms", vsock=False)
        h = Host(tmp_path, lambda sv: QemuBackend(cfg, sv))
        yield h
        await h.close()

    def spec(self, vm_id: str, *, cid: int, ports: tuple[PortMap, ...] = ()) -> CvmSpec:
        return CvmSpec(vm_id=vm_id, image=IMAGE, vcpu=2, memory_mb=1536, cid=cid, ports=ports,
                       app_compose=b'{"name":"contract"}')  # fmt: skip
