"""A blocking client of the VMM API for tests, built the way dstack's ``vmm-cli.py`` builds its
own (http.client over ``unix:/path`` or TCP, optional Basic or Bearer auth), so what passes here
passes for dstack's CLI."""

from __future__ import annotations

import base64
import http.client
import json
import socket
from typing import Any


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


def request(
    url: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    headers: dict[str, str] | None = None,
    bearer: str = "",
    basic: tuple[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, Any]:
    """(status, decoded JSON or text) of one request to the VMM API at ``url``."""
    h = dict(headers or {})
    if bearer:
        h["Authorization"] = f"Bearer {bearer}"
    if basic:
        h["Authorization"] = "Basic " + base64.b64encode(":".join(basic).encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        h["Content-Type"] = "application/json"
    if url.startswith("unix:"):
        conn: http.client.HTTPConnection = _UnixConnection(url[5:], timeout)
    else:
        conn = http.client.HTTPConnection(url.split("://", 1)[1].rstrip("/"), timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        raw = r.read()
    finally:
        conn.close()
    try:
        return r.status, json.loads(raw)
    except ValueError:
        return r.status, raw.decode(errors="replace")


def call(url: str, rpc: str, body: dict[str, Any] | None = None, **kw: Any) -> Any:
    """``POST /prpc/<rpc>``; the answer, or AssertionError with the status and error."""
    status, answer = request(url, "POST", f"/prpc/{rpc}", body or {}, **kw)
    if status != 200:
        raise AssertionError(f"{rpc}: {status} {answer}")
    return answer
