"""Wire-level helpers of the event store: publish acks, server timestamps, reachability."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

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


class Acks:
    """Publish acks multiplexed on one ``<inbox>.*`` subscription.

    Like nats-py's ``publish_async``, which cannot be used here: its reply handler lets
    ``APIError.from_error`` raise inside the callback, so an error ack (a wrong expected
    sequence) never reaches the future and the caller waits for the timeout instead.
    """

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox() + "."
        self.futures: dict[str, asyncio.Future[int]] = {}
        self.next_token = 0
        self.sub: Any = None

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str], timeout: float
    ) -> int:
        if self.sub is None:
            self.sub = await self.nc.subscribe(self.prefix + "*", cb=self._on_reply)
        self.next_token += 1
        token = str(self.next_token)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self.futures[token] = fut
        timer = loop.call_later(timeout, expire, fut)
        try:
            await self.nc.publish(subject, data, reply=self.prefix + token, headers=headers)
            return await fut
        finally:
            timer.cancel()
            self.futures.pop(token, None)

    async def _on_reply(self, msg: Msg) -> None:
        fut = self.futures.get(msg.subject[len(self.prefix) :])
        if fut is None or fut.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            fut.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            resp = json.loads(msg.data)
            err = resp.get("error")
            if err is None:
                fut.set_result(int(resp["seq"]))
                return
            nats.js.errors.APIError.from_error(err)  # raises the typed error
        except nats.js.errors.APIError as exc:
            fut.set_exception(exc)
        except (ValueError, KeyError, TypeError) as exc:
            fut.set_exception(StoreError(f"unreadable publish ack: {exc}"))


def expire(fut: asyncio.Future[int]) -> None:
    if not fut.done():
        fut.set_exception(nats.errors.TimeoutError())


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
