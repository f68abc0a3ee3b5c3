"""Client of a host's VMM API (``pydstack.actors.vmm``, dstack's ``/prpc/<Method>`` shape), over
its unix socket (``unix:/path``, as dstack's ``vmm-cli.py --url``) or TCP with its token.

Usage::

    async with VmmApi("unix:/var/lib/pydstack/vmm/api/vmm.sock") as api:
        vms = await api.call("Status", {})
        async with api.get(f"/logs/{vm_id}?follow=1") as r: ...
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import msgspec


class VmmApiError(RuntimeError):
    """The API refused a call or could not be reached; one line naming the URL or reason."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def read_token(path: Path) -> str:
    """The API token in ``path`` (``<vmm state dir>/api/token``), or a one-line error."""
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise VmmApiError(f"VMM API token {path}: {exc.strerror or exc}") from None


class VmmApi:
    def __init__(self, url: str, *, token: str = "", timeout_s: float | None = 60.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_read=timeout_s)
        if self.url.startswith("unix:"):
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=self.url[5:])
            self.base = "http://localhost"
        else:
            connector, self.base = aiohttp.TCPConnector(), self.url
        self.session = aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.session.close()

    def get(self, path: str) -> Any:
        """``async with api.get("/logs/ID") as r``: a raw GET (for streams)."""
        return self.session.get(self.base + path)

    async def call(self, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST ``/prpc/<method>`` with JSON; the decoded answer, or :class:`VmmApiError`."""
        try:
            async with self.session.post(f"{self.base}/prpc/{method}", json=body or {}) as r:
                data = await r.read()
                status = r.status
        except aiohttp.ClientError as exc:
            raise VmmApiError(f"VMM API {self.url}: {exc}") from None
        try:
            answer: dict[str, Any] = msgspec.json.decode(data) if data else {}
        except msgspec.DecodeError:
            answer = {"error": data[:200].decode(errors="replace")}
        if status >= 400:
            raise VmmApiError(f"VMM API {method}: {answer.get('error', f'HTTP {status}')}", status)
        return answer
