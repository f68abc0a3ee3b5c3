"""dstack's reserved ids `health` and `gateway`: answered by the gateway itself, not routed.

dstack v0.5.11 (`gateway/src/proxy/tls_terminate.rs` `proxy`): a terminated name whose id is
`health` or `gateway` (`health.<base>`, `gateway-80.<base>`, ...) reaches no app; TLS ends
at the gateway (port 80 only, any other is refused) and it answers HTTP/1 itself:

- `health` (deprecated there, kept for old probes): `GET /` 200, anything else 404.
- `gateway`: a non-GET 405; `GET /health` 200; `GET /index` (or `/.dstack/index`) the JSON
  `{"type": "dstack gateway", "paths": ["/index", "/app-info", "/acme-info"]}`; else 404.
  dstack's `/app-info` (its own CVM's guest-agent Info) and `/acme-info` are not served here
  (404): a pydstack gateway node is no CVM with a guest agent, and its ACME state is on the log.

One request per connection (`Connection: close`); the request head is read at most
`MAX_HEAD` bytes far within the handshake timeout, anything else closes the connection.

    status, body = answer("gateway", "GET", "/.dstack/index")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from typing import Final

RESERVED: Final = frozenset({"health", "gateway"})
PORT: Final = 80  # the only port dstack answers them on
MAX_HEAD: Final = 8192
INDEX: Final = {"type": "dstack gateway", "paths": ["/index", "/app-info", "/acme-info"]}
_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def answer(ident: str, method: str, target: str) -> tuple[int, bytes]:
    """(status, JSON body or b"") dstack's gateway gives `method target` on reserved `ident`."""
    path = target.split("?", 1)[0]
    if ident == "health":
        return (200, b"") if method == "GET" and path == "/" else (404, b"")
    if method != "GET":
        return 405, b""
    if path == "/health":
        return 200, b""
    while path.startswith("/.dstack"):  # Rust's trim_start_matches: every leading repeat
        path = path[len("/.dstack") :]
    if path == "/index":
        return 200, json.dumps(INDEX).encode()
    return 404, b""


def _response(status: int, body: bytes) -> bytes:
    head = [f"HTTP/1.1 {status} {_REASONS[status]}", f"content-length: {len(body)}"]
    if body:
        head.append("content-type: application/json")
    return ("\r\n".join([*head, "connection: close", "", ""])).encode() + body


def _request_line(head: bytes) -> tuple[str, str] | None:
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        return None
    return parts[0], parts[1]


async def serve_reserved(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    ident: str,
    ctx: ssl.SSLContext,
    timeout: float,
) -> None:
    """Terminate TLS on `sock` with `ctx` and answer one request for reserved `ident`."""
    reader = asyncio.StreamReader(limit=MAX_HEAD)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_accepted_socket(
        lambda: protocol, sock, ssl=ctx, ssl_handshake_timeout=timeout
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    try:
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
        request = _request_line(head)
        status, body = (400, b"") if request is None else answer(ident, *request)
        writer.write(_response(status, body))
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError,
            ConnectionError, ssl.SSLError):  # fmt: skip
        pass  # a client that sends no request head (or too much) just gets closed
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            await writer.wait_closed()
