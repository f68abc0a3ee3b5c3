"""Byte relays between asyncio streams (the sandbox's host relays and port forwards, the QEMU
guest's loopback relays)."""

from __future__ import annotations

import asyncio
import contextlib


async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Copy `r` to `w` until EOF, then half-close `w`; a peer that vanishes just ends it."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
