"""Wire-level helpers of the event store: publish acks, server timestamps, reachability."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Final

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from pydstack.core.events import message_hash

from ._types import Version
from .errors import StoreError


def stamp(msg: Msg) -> int:
    raw = (msg.headers or {}).get("Nats-Time-Stamp", "")
    if not raw:
        return 0
    # RFC 3339 with nanoseconds; the sub-second part is what makes ordering readable.
    from datetime import datetime

    head, _, frac = raw.rstrip("Z").partition(".")
    secs = datetime.fromisoformat(head + "+00:00").timestamp()
    return int(secs) * 1_000_000_000 + int((frac + "000000000")[:9])


class _Ack(msgspec.Struct):
    """A JetStream publish ack: the stored sequence, or the API error that refused it."""

    seq: int | None = None
    error: dict[str, Any] | None = None


_ack_decoder: Final = msgspec.json.Decoder(_Ack)


class Acks:
    """Publish acks multiplexed on one ``<inbox>.*`` subscription.

    Like nats-py's ``publish_async``, which cannot be used here: its reply handler lets
    ``APIError.from_error`` raise inside the callback, so an error ack (a wrong expected
    sequence) never reaches the future and the caller waits for the timeout instead.

    Timeouts are enforced by one sweeper timer over every pending ack, not a timer per
    publish: arming and cancelling a loop timer per append was ~15% of an append's CPU
    (bench.append). An ack that times out does so within `SWEEP_S` of its deadline.
    """

    SWEEP_S: Final = 0.05

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox() + "."
        self.pending: dict[str, tuple[asyncio.Future[int], float]] = {}
        self.next_token = 0
        self.sub: Any = None
        self.sweeper: asyncio.TimerHandle | None = None

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str], timeout: float
    ) -> int:
        if self.sub is None:
            self.sub = await self.nc.subscribe(self.prefix + "*", cb=self._on_reply)
        self.next_token += 1
        token = str(self.next_token)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self.pending[token] = (fut, loop.time() + timeout)
        if self.sweeper is None:
            self.sweeper = loop.call_later(self.SWEEP_S, self._sweep)
        try:
            await self.nc.publish(subject, data, reply=self.prefix + token, headers=headers)
            return await fut
        finally:
            self.pending.pop(token, None)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for fut, deadline in self.pending.values():
            if deadline <= now:
                expire(fut)
        self.sweeper = loop.call_later(self.SWEEP_S, self._sweep) if self.pending else None

    async def _on_reply(self, msg: Msg) -> None:
        entry = self.pending.get(msg.subject[len(self.prefix) :])
        if entry is None or entry[0].done():
            return
        fut = entry[0]
        if msg.headers and msg.headers.get("Status") == "503":
            fut.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            ack = _ack_decoder.decode(msg.data)
            if ack.error is not None:
                nats.js.errors.APIError.from_error(ack.error)  # raises the typed error
            if ack.seq is None:
                raise ValueError("an ack with neither seq nor error")
            fut.set_result(ack.seq)
        except nats.js.errors.APIError as exc:
            fut.set_exception(exc)
        except (msgspec.DecodeError, ValueError, KeyError, TypeError) as exc:
            fut.set_exception(StoreError(f"unreadable publish ack: {exc}"))


def expire(fut: asyncio.Future[int]) -> None:
    if not fut.done():
        fut.set_exception(nats.errors.TimeoutError())


async def request(
    nc: Client, subject: str, payload: bytes, timeout: float, headers: dict[str, str] | None = None
) -> Msg:
    """Publish with a reply inbox and return the reply, like ``nc.request``, but never losing
    a cancel: nats-py awaits the reply with ``asyncio.wait_for``, which on Python 3.11 returns
    the reply when it and a cancel arrive in the same loop iteration. A loop cancelled there
    runs on (a gateway's CertKeeper did, after ``running()`` exited, and its owner's
    ``await task`` never returned). Raises like ``nc.request``: ``nats.errors.TimeoutError``,
    ``NoRespondersError``."""
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[Msg] = loop.create_future()

    async def collect(msg: Msg) -> None:
        if not reply.done():
            reply.set_result(msg)

    sub = await nc.subscribe(nc.new_inbox(), cb=collect)
    try:
        await nc.publish(subject, payload, reply=sub.subject, headers=headers)
        try:
            async with asyncio.timeout(timeout):
                msg = await reply
        except TimeoutError:
            raise nats.errors.TimeoutError from None
    finally:
        with contextlib.suppress(nats.errors.ConnectionClosedError):
            await sub.unsubscribe()
    if msg.headers and msg.headers.get("Status") == "503" and not msg.data:
        raise nats.errors.NoRespondersError
    return msg


def versions_after(
    msgs: list[tuple[str, bytes, dict[str, str]]], last_seq: int
) -> dict[str, Version]:
    # An atomic batch occupies consecutive sequences ending at last_seq.
    first = last_seq - len(msgs) + 1
    out: dict[str, Version] = {}
    for offset, (subj, data, _) in enumerate(msgs):
        out[subj] = Version(first + offset, message_hash(data))
    return out


async def any_reachable(servers: Sequence[str], timeout: float) -> bool:
    from urllib.parse import urlsplit

    for server in servers:
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 4222),
                timeout,
            )
        except (OSError, TimeoutError):
            continue
        writer.close()
        return True
    return False
