"""The sandbox backend keeps the CvmBackend contract (real supervisor, dockerd, namespaces)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pydstack.adapters.cvm import CvmSpec
from pydstack.adapters.sandbox import SandboxBackend, SandboxConfig, build_busybox_image
from pydstack.core.events import PortMap

from .contract import CvmBackendContract, Host

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("dockerd") is None,
    reason="the sandbox backend needs root and dockerd (apt-get install docker.io)",
)

COMPOSE = """services:
  web:
    image: busybox:latest
    command: httpd -f -p 8080 -h /www
    ports:
      - "8080:8080"
"""


def sandbox_compose(name: str = "web") -> bytes:
    return json.dumps({"name": name, "docker_compose_file": COMPOSE}).encode()


@pytest.fixture(scope="session")
def sandbox_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sandbox-images")
    build_busybox_image(root)
    return root


class TestSandboxContract(CvmBackendContract):
    BOOT_TIMEOUT_S = 30.0

    @pytest.fixture
    async def host(self, tmp_path: Path, sandbox_images: Path) -> AsyncIterator[Host]:
        run_root = Path("/run/pydstack-test") / tmp_path.name
        cfg = SandboxConfig(vms_dir=tmp_path / "vms", images=sandbox_images, run_root=run_root)
        h = Host(tmp_path, lambda sv: SandboxBackend(cfg, sv))
        yield h
        await h.close()
        shutil.rmtree(cfg.run_root, ignore_errors=True)

    def spec(self, vm_id: str, *, cid: int, ports: tuple[PortMap, ...] = ()) -> CvmSpec:
        return CvmSpec(vm_id=vm_id, image="sandbox-busybox", vcpu=1, memory_mb=256, cid=cid,
                       ports=ports, app_compose=sandbox_compose())  # fmt: skip
