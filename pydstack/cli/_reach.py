"""Is a deployed app's URL answering? One HTTPS GET through the gateway, retried until a deadline.

The gateway of a local ``pydstack up`` serves dev names (``*.gw.localhost``) that DNS may not
resolve, under a dev CA: for its domain the GET goes to up's proxy address (``gateway_proxy``)
with the app's name as SNI and Host, trusting up's ``gateway/ca.pem``. Any other URL is
fetched as it is, with the system's trust store::

    status, detail = await https_get(url, connect_to=("127.0.0.1", 8443), ca_pem=ca)
    ok, text = await wait_reachable(url, deadline=time.monotonic() + 30, ...)
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from urllib.parse import urlsplit

RETRY_S = 0.3


async def https_get(
    url: str, *, connect_to: tuple[str, int] | None = None, ca_pem: str | None = None,
    timeout_s: float = 5.0,
) -> tuple[int, bytes]:  # fmt: skip
    """(status, body) of ``GET url``; OSError/ssl.SSLError/TimeoutError when it fails."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    ctx = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    addr = connect_to or (host, parts.port or 443)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(*addr, ssl=ctx, server_hostname=host)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n"
                         "User-Agent: pydstack-deploy\r\n\r\n".encode())  # fmt: skip
            data = await reader.read()
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise OSError(f"not an HTTP answer: {head[:60]!r}")
    return int(status_line[1]), body


async def wait_reachable(
    url: str, *, deadline: float, connect_to: tuple[str, int] | None = None,
    ca_pem: str | None = None,
) -> tuple[bool | None, str]:  # fmt: skip
    """(True, "HTTP 200") once a GET answers below 500, (False, the last failure) at the
    deadline; 5xx (the gateway has no route or peer yet) and network errors are retried.
    (None, why) at once when the name does not resolve here: nothing can be checked."""
    last = "no attempt"
    while True:
        try:
            left = max(1.0, min(5.0, deadline - time.monotonic()))
            status, _ = await https_get(url, connect_to=connect_to, ca_pem=ca_pem, timeout_s=left)
            if status < 500:
                return True, f"HTTP {status}"
            last = f"HTTP {status}"
        except socket.gaierror as e:
            return None, f"{urlsplit(url).hostname} does not resolve here ({e.strerror})"
        except TimeoutError:
            last = "no answer in time (is the tunnel up?)"
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() + RETRY_S > deadline:
            return False, last
        await asyncio.sleep(RETRY_S)
