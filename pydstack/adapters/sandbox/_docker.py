"""The few docker engine API calls a sandbox guest makes (over its unix socket)."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp

API = "http://docker/v1.41"


class DockerError(RuntimeError):
    pass


class Docker:
    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)))

    async def close(self) -> None:
        await self.session.close()

    async def _req(self, method: str, path: str, **kw: Any) -> tuple[int, bytes]:
        async with self.session.request(method, f"{API}{path}", **kw) as r:
            return r.status, await r.read()

    async def ping(self) -> bool:
        try:
            status, _ = await self._req("GET", "/_ping", timeout=aiohttp.ClientTimeout(total=1))
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False
        return status == 200

    async def has_image(self, name: str) -> bool:
        status, _ = await self._req("GET", f"/images/{name}/json")
        return status == 200

    async def import_image(self, tar: Path, name: str) -> None:
        repo, _, tag = name.partition(":")
        params = {"fromSrc": "-", "repo": repo, "tag": tag or "latest"}
        data = await asyncio.to_thread(tar.read_bytes)
        status, body = await self._req("POST", "/images/create", params=params, data=data)
        if status != 200 or b'"error"' in body:
            raise DockerError(f"import {name}: {status} {body[-200:]!r}")

    async def run(
        self, name: str, image: str, cmd: Iterable[str], entrypoint: Iterable[str],
        env: dict[str, str], binds: list[str],
    ) -> str:  # fmt: skip
        await self._req("DELETE", f"/containers/{name}", params={"force": "true"})
        spec: dict[str, Any] = {
            "Image": image, "Env": [f"{k}={v}" for k, v in env.items()],
            "HostConfig": {"NetworkMode": "host", "Binds": binds, "Init": True},
        }  # fmt: skip
        if cmd := list(cmd):
            spec["Cmd"] = cmd
        if ep := list(entrypoint):
            spec["Entrypoint"] = ep
        status, body = await self._req("POST", "/containers/create", params={"name": name},
                                       json=spec)  # fmt: skip
        if status != 201:
            raise DockerError(f"create {name}: {status} {body[-300:].decode(errors='replace')}")
        status, body = await self._req("POST", f"/containers/{name}/start")
        if status not in (204, 304):
            raise DockerError(f"start {name}: {status} {body[-300:].decode(errors='replace')}")
        return name

    async def stop_all(self, timeout_s: int = 2) -> None:
        status, body = await self._req("GET", "/containers/json")
        if status != 200:
            return
        ids = [c["Id"] for c in json.loads(body)]
        await asyncio.gather(
            *(self._req("POST", f"/containers/{i}/stop", params={"t": str(timeout_s)}) for i in ids)
        )

    async def containers(self) -> list[str]:
        """The names of the engine's containers, running or not."""
        return list(await self.services())

    async def services(self) -> dict[str, str]:
        """Each container's name -> its compose service (its name when compose made none)."""
        status, body = await self._req("GET", "/containers/json", params={"all": "1"})
        if status != 200:
            raise DockerError(f"list containers: {status} {body[-200:]!r}")
        out = {}
        for c in json.loads(body):
            name = c["Names"][0].lstrip("/")
            out[name] = (c.get("Labels") or {}).get("com.docker.compose.service") or name
        return out

    async def wait(self, name: str) -> tuple[int, bool]:
        """Wait until the container ends: (exit code, whether the OOM killer ended it)."""
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        status, body = await self._req("POST", f"/containers/{name}/wait", timeout=timeout)
        code = int(json.loads(body).get("StatusCode", -1)) if status == 200 else -1
        status, body = await self._req("GET", f"/containers/{name}/json")
        oom = status == 200 and bool(json.loads(body).get("State", {}).get("OOMKilled"))
        return code, oom

    async def follow_logs(self, name: str, out: Path, label: str = "") -> None:
        """Append the container's stdout/stderr to ``out`` until it ends (demultiplexed),
        each chunk after ``[label]`` (default: the container's name)."""
        params = {"follow": "1", "stdout": "1", "stderr": "1"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self.session.get(f"{API}/containers/{name}/logs", params=params,
                                    timeout=timeout) as r:  # fmt: skip
            with out.open("ab") as f:
                while True:
                    try:
                        head = await r.content.readexactly(8)
                    except asyncio.IncompleteReadError:
                        return
                    (size,) = struct.unpack(">I", head[4:])
                    data = await r.content.readexactly(size)
                    f.write(b"[" + (label or name).encode() + b"] " + data)
                    f.flush()
