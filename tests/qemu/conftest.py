"""A host for backend tests: a real supervisor process and a QemuBackend on it."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pydstack.actors.supervisor import SupervisorClient, launch_supervisor
from pydstack.adapters.qemu import QemuBackend, QemuBackendConfig, images_dir


class Host:
    """The supervisor process plus a backend talking to it, restartable like a real host."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "sv.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: SupervisorClient | None = None

    async def start(self, images: Path | None = None) -> QemuBackend:
        self.proc = launch_supervisor(self.socket, self.root / "supervisor")
        self.client = SupervisorClient(self.socket)
        await self.client.wait_ready()
        cfg = QemuBackendConfig(
            vms_dir=self.root / "vms", images=images or images_dir(), vsock=False
        )
        return QemuBackend(cfg, self.client)

    async def kill9(self) -> None:
        assert self.proc is not None and self.client is not None
        self.proc.kill()
        self.proc.wait()
        await self.client.close()


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    h = Host(tmp_path)
    yield h
    if h.client is not None and h.proc is not None and h.proc.poll() is None:
        for p in await h.client.list():  # never leave a QEMU behind
            if p.running:
                await h.client.kill(p.config.id)
        await h.client.close()
        h.proc.terminate()
        h.proc.wait()
