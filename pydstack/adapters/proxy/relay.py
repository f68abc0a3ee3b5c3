"""Byte relay between a client and a backend transport, built on asyncio protocols.

Protocols (not streams) keep the per-chunk cost to one ``transport.write``: each side's
``data_received`` writes straight into the other transport, and the write buffer's
``pause_writing``/``resume_writing`` pause and resume reading on the other side. A TLS
client side is a `BufferedHalf`: asyncio's and uvloop's TLS transports hand a plain
protocol each read as a fresh 256 KiB ``bytes`` cut down to size (a large allocation per
read), a buffered one the plaintext in a buffer it owns.

Half-close: when ``half_close`` is on and the other transport supports it, an EOF is
passed on with ``write_eof()``. With it off (the default under uvloop 0.23, which aborts
the process when a relay calls ``write_eof()`` under connection churn) a client EOF is
passed to the backend with ``shutdown(SHUT_WR)`` on a duplicate of its socket, outside
the loop's transport state, while the backend's answer keeps flowing; a backend EOF
closes both sides once buffered data is flushed. TLS transports never half-close.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Literal, cast

_PENDING_MAX = 256 * 1024  # bytes buffered for a side whose peer is not connected yet

Side = Literal["client", "backend"]


class Half(asyncio.Protocol):
    """One side of a `Link`."""

    def __init__(self, link: Link, side: Side) -> None:
        self.link = link
        self.side = side
        self.transport: asyncio.Transport | None = None
        self.peer: Half | None = None
        self.pending = bytearray()
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.link.progress += len(data)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if not peer.transport.is_closing():
                peer.transport.write(data)
            return
        self.pending += data
        if len(self.pending) > _PENDING_MAX and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        keep_open = self.link.on_eof(self)
        # A TLS transport closes itself after EOF whatever we answer (asyncio warns on True).
        return keep_open and self.transport is not None and not _is_tls(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.link.on_lost(self)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


_READ_BUFFER = bytearray(64 * 1024)  # shared: filled and copied out within one callback
_READ_VIEW = memoryview(_READ_BUFFER)


class BufferedHalf(Half, asyncio.BufferedProtocol):
    """A `Half` read through ``get_buffer``/``buffer_updated`` (for TLS transports).

    The loop fills the buffer and calls ``buffer_updated`` in the same callback, so one
    buffer serves every connection; the bytes are copied out before the next read."""

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_READ_VIEW[:nbytes]))


def _is_tls(transport: asyncio.BaseTransport) -> bool:
    return transport.get_extra_info("sslcontext") is not None


def _close(half: Half | None) -> None:
    if half is not None and half.transport is not None and not half.transport.is_closing():
        half.transport.close()  # flushes what is buffered, then closes


class Link:
    """A client `Half` and (once connected) a backend `Half`, relaying until both end."""

    def __init__(
        self,
        *,
        half_close: bool,
        idle_timeout: float | None = None,
        total_timeout: float | None = None,
        buffered_client: bool = False,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.half_close = half_close
        self.client = (BufferedHalf if buffered_client else Half)(self, "client")
        self.backend: Half | None = None
        self.progress = 0
        self.timed_out = False
        self._joined = False
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._total_timer: asyncio.TimerHandle | None = None
        if idle_timeout:
            # Sample progress four times per window: one timer per window, not per read.
            tick = max(idle_timeout / 4, 0.05)
            self._idle_timer = self._loop.call_later(tick, self._idle_tick, tick, 0, -1)
        if total_timeout:
            self._total_timer = self._loop.call_later(total_timeout, self._expire)

    def new_backend_half(self) -> Half:
        """A protocol for one backend connection attempt (only the winner gets joined)."""
        return Half(self, "backend")

    def join(
        self,
        client_transport: asyncio.BaseTransport,
        backend: Half,
        backend_transport: asyncio.BaseTransport,
        preamble: bytes = b"",
    ) -> None:
        """Pair the halves: send ``preamble`` (PROXY header), then flush what each side sent.

        The transports are passed in because uvloop may call ``connection_made`` only after
        ``create_connection`` has returned.
        """
        client = self.client
        for half, transport in ((client, client_transport), (backend, backend_transport)):
            if half.transport is None:
                half.transport = cast(asyncio.Transport, transport)
        assert client.transport is not None and backend.transport is not None
        self.backend = backend
        client.peer, backend.peer = backend, client
        self._joined = True
        if preamble:
            backend.transport.write(preamble)
        for src, dst in ((client, backend), (backend, client)):
            if src.pending:
                assert dst.transport is not None
                dst.transport.write(bytes(src.pending))
                src.pending.clear()
                assert src.transport is not None
                if not src.lost:
                    src.transport.resume_reading()
        for half in (client, backend):
            if half.lost:
                self.on_lost(half)
            elif half.eof:
                self.on_eof(half)

    def on_eof(self, half: Half) -> bool:
        """Decide what an EOF means; True keeps ``half``'s transport open for writing."""
        peer = half.peer
        if not self._joined or peer is None or peer.transport is None:
            return True  # handled at join()
        if peer.eof:
            self.close()
            return True
        if self.half_close and peer.transport.can_write_eof():
            if not peer.transport.is_closing():
                peer.transport.write_eof()
            return True
        if half.side == "client":
            # Pass the EOF on below the event loop: shutdown(SHUT_WR) on a duplicate of the
            # backend socket once its buffer is flushed; keep reading the backend's answer.
            self._shutdown_backend_write(peer.transport, 0)
            return True
        _close(peer)
        return False

    def on_lost(self, half: Half) -> None:
        if half.side == "backend" and half is not self.backend:
            # A connection attempt that lost the first-wins race (closed after the winner
            # was joined): not part of this link, so it must not end it.
            return
        if not self._joined:
            if half is self.client:
                self._finish()
            return
        _close(half.peer)
        peer = half.peer
        if peer is None or peer.lost:
            self._finish()

    def _shutdown_backend_write(self, transport: asyncio.Transport, tries: int) -> None:
        if transport.is_closing() or self._done.done():
            return
        if transport.get_write_buffer_size() and tries < 500:
            self._loop.call_later(0.01, self._shutdown_backend_write, transport, tries + 1)
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            dup = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return
        with contextlib.suppress(OSError), dup:
            dup.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Close both sides after flushing; the link finishes when both are gone."""
        _close(self.client)
        _close(self.backend)
        if not self._joined:
            self._finish()

    def abort(self) -> None:
        """Drop both sides now, discarding buffered data."""
        for half in (self.client, self.backend):
            if half is not None and half.transport is not None:
                half.transport.abort()
        self._finish()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._done)

    def _finish(self) -> None:
        for timer in (self._idle_timer, self._total_timer):
            if timer is not None:
                timer.cancel()
        if not self._done.done():
            self._done.set_result(None)

    def _idle_tick(self, tick: float, idle_ticks: int, last: int) -> None:
        if self._done.done():
            return
        idle_ticks = idle_ticks + 1 if self.progress == last else 0
        if idle_ticks >= 4:
            self.timed_out = True
            self.abort()
            return
        self._idle_timer = self._loop.call_later(
            tick, self._idle_tick, tick, idle_ticks, self.progress
        )

    def _expire(self) -> None:
        self.timed_out = True
        self.abort()
