"""Riding out a leader election: the store retries a call that failed only because the stream
had no leader, under the backoff and deadline of the `riding_out` scope it runs in.

Usage::

    with riding_out(Backoff(deadline_s=30), notify=print):
        await store.commit(changes)      # waits out an election instead of failing

A scope, not a store setting, because one connection serves callers with different needs: the
dashboard's write handlers ride out an election, the actors sharing its store fail fast and let
JetStream redeliver. Outside any scope the store behaves as before (a few quick retries).

Only the outermost store call retries; calls it makes itself (the read that recognises our own
landed append) fail through to it, so one operation has one deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Final, TypeVar

from pydstack.core.retry import Backoff

from .errors import NoLeader

T = TypeVar("T")


class Leaderless(Exception):
    """One try failed the way an election fails (no responders, no answer in time, a replica
    that has not caught up yet). `fallback` is what a caller outside `riding_out` gets."""

    def __init__(self, detail: str, fallback: Exception, *, maybe_missing: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fallback = fallback
        self.maybe_missing = maybe_missing  # the stream may simply not exist: ask before waiting


@dataclass(frozen=True, slots=True)
class RideOut:
    backoff: Backoff
    notify: Callable[[str], None] | None = None  # progress lines for a person watching


_SCOPE: ContextVar[RideOut | None] = ContextVar("pydstack_ride_out", default=None)
_INSIDE: ContextVar[bool] = ContextVar("pydstack_ride_out_inside", default=False)
_DEADLINE: ContextVar[float | None] = ContextVar("pydstack_ride_out_deadline", default=None)
MIN_TRY_S: Final = 1.0  # the last try still gets this long for its answer


def try_timeout(default: float) -> float:
    """How long one try may wait for its answer: `default`, but inside a ride-out no longer
    than the deadline leaves (at least `MIN_TRY_S`), so "up to N s" holds to about a second."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return default
    left = deadline - asyncio.get_running_loop().time()
    return max(MIN_TRY_S, min(default, left)) if default > MIN_TRY_S else default


@contextmanager
def riding_out(backoff: Backoff, notify: Callable[[str], None] | None = None) -> Iterator[None]:
    """Store calls in this scope (this task and tasks it starts) wait out elections."""
    token = _SCOPE.set(RideOut(backoff, notify))
    try:
        yield
    finally:
        _SCOPE.reset(token)


async def retrying(
    what: str,
    once: Callable[[], Awaitable[T]],
    *,
    quick_tries: int = 0,
    stream_missing: Callable[[], Awaitable[Exception | None]] | None = None,
) -> T:
    """Run `once` until it does not raise `Leaderless`: inside `riding_out` until its deadline
    (then `NoLeader`); outside, `quick_tries` more times 0.1 s apart (then the fallback)."""
    if _INSIDE.get():
        return await once()  # the outermost call retries
    scope = _SCOPE.get()
    loop = asyncio.get_running_loop()
    start = loop.time()
    attempt = 0
    told = False
    while True:
        token = _INSIDE.set(True)
        limit = _DEADLINE.set(start + scope.backoff.deadline_s if scope else None)
        try:
            result = await once()
        except Leaderless as exc:
            attempt += 1
            if scope is None:
                if attempt > quick_tries:
                    raise exc.fallback from None
                await asyncio.sleep(0.1 * attempt)
                continue
            if exc.maybe_missing and stream_missing is not None:
                missing = await stream_missing()  # the stream does not exist: no use waiting
                if missing is not None:
                    raise missing from None
            delay = scope.backoff.delay(attempt, loop.time() - start)
            if delay is None:
                raise NoLeader(what, scope.backoff.deadline_s, exc.detail) from None
            if not told and scope.notify is not None:
                told = True
                scope.notify(
                    f"{what}: stream has no leader, retrying for up to "
                    f"{scope.backoff.deadline_s:g} s"
                )
            await asyncio.sleep(delay)
            continue
        finally:
            _DEADLINE.reset(limit)
            _INSIDE.reset(token)
        if told and scope is not None and scope.notify is not None:
            scope.notify(f"{what}: the stream has a leader again after {loop.time() - start:.1f} s")
        return result
