"""Host services a sandbox CVM may call (its KMS), reachable at the same URL from inside.

The CVM's namespace has only a loopback, so ``https://127.0.0.1:P`` of the host's KMS is
served inside by a TCP listener on the same address that relays each connection over a Unix
socket (file paths cross namespaces) to a thread left in the host's namespace, which connects
to the real port. TLS runs end to end through it; nothing is terminated here.

    relay = HostRelay.start(["https://127.0.0.1:9100"], prefix)  # before entering the netns
    servers = await relay.serve_inside()                            # after
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def loopback_targets(urls: list[str]) -> list[tuple[str, int]]:
    out = []
    for u in urls:
        p = urlsplit(u)
        if p.hostname in LOOPBACK:
            out.append((p.hostname or "127.0.0.1", p.port or (443 if p.scheme == "https" else 80)))
    return sorted(set(out))


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()


async def _relay(r: asyncio.StreamReader, w: asyncio.StreamWriter, connect: object) -> None:
    try:
        r2, w2 = await connect()  # type: ignore[operator]
    except OSError:
        w.close()
        return
    await asyncio.gather(_pipe(r, w2), _pipe(r2, w))
    for x in (w, w2):
        x.close()


class HostRelay:
    def __init__(self, targets: list[tuple[str, int]], prefix: str) -> None:
        self.targets = targets
        self.paths = {t: Path(f"{prefix}.out{t[1]}.sock") for t in targets}

    @classmethod
    def start(cls, urls: list[str], prefix: str) -> HostRelay:
        """Bind the host-side Unix sockets in a daemon thread (call in the host namespace)."""
        relay = cls(loopback_targets(urls), prefix)
        if relay.targets:
            ready = threading.Event()
            threading.Thread(target=asyncio.run, args=(relay._host(ready),), daemon=True).start()
            if not ready.wait(10):
                raise OSError("host relay did not start")
        return relay

    async def _host(self, ready: threading.Event) -> None:
        for (host, port), path in self.paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)

            def handler(
                r: asyncio.StreamReader, w: asyncio.StreamWriter, h: str = host, p: int = port
            ) -> asyncio.Future[None]:
                return asyncio.ensure_future(_relay(r, w, lambda: asyncio.open_connection(h, p)))

            await asyncio.start_unix_server(handler, path=str(path))
        ready.set()
        await asyncio.Event().wait()  # serve for the life of the process

    async def serve_inside(self) -> list[asyncio.Server]:
        """TCP listeners on the targets' addresses inside the CVM's namespace."""
        out = []
        for (host, port), path in self.paths.items():

            def handler(
                r: asyncio.StreamReader, w: asyncio.StreamWriter, u: str = str(path)
            ) -> asyncio.Future[None]:
                return asyncio.ensure_future(_relay(r, w, lambda: asyncio.open_unix_connection(u)))

            out.append(await asyncio.start_server(handler, host, port))
        return out
