"""``docker-registry serve`` on a loopback port, its storage in a directory of ours."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydstack.adapters.nats import free_port

BINARY = "docker-registry"


class RegistryError(RuntimeError):
    pass


def config_text(storage: Path, port: int, host: str = "127.0.0.1") -> str:
    """distribution's config (YAML; JSON is YAML): no auth, loopback only, files in `storage`."""
    return json.dumps({
        "version": 0.1, "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": f"{host}:{port}", "headers": {"X-Content-Type-Options": ["nosniff"]}},
    })  # fmt: skip


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _prepare(root: Path, port: int) -> BinaryIO:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yml").write_text(config_text(root / "storage", port))
    return (root / "registry.log").open("ab")


@dataclass
class LocalRegistry:
    url: str  # http://127.0.0.1:PORT
    port: int
    storage: Path
    proc: asyncio.subprocess.Process

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, root: Path, port: int = 0, timeout_s: float = 10.0
                    ) -> AsyncIterator[LocalRegistry]:  # fmt: skip
        """Serve `root`/storage on 127.0.0.1:`port` (0: a free one) while in the block."""
        binary = shutil.which(BINARY)
        if binary is None:
            raise RegistryError(f"{BINARY} not found: apt-get install docker-registry")
        port = port or free_port()
        log = await asyncio.to_thread(_prepare, root, port)
        proc = await asyncio.create_subprocess_exec(
            binary, "serve", str(root / "config.yml"), stdout=log, stderr=log,
            stdin=asyncio.subprocess.DEVNULL)  # fmt: skip
        reg = cls(url=f"http://127.0.0.1:{port}", port=port, storage=root / "storage", proc=proc)
        try:
            deadline = asyncio.get_running_loop().time() + timeout_s
            while not await asyncio.to_thread(_answers, reg.url):
                if proc.returncode is not None or asyncio.get_running_loop().time() > deadline:
                    tail = (root / "registry.log").read_text(errors="replace").strip()
                    raise RegistryError(f"{BINARY} on port {port} did not start: {tail[-300:]}")
                await asyncio.sleep(0.05)
            yield reg
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    async with asyncio.timeout(5):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            log.close()
