"""The event loop of the processes that carry the gateway's data plane: uvloop when installed.

The built-in proxy relays bytes through asyncio transports, and uvloop's (libuv, Cython)
cost a fraction of the stock loop's per read, write and connection. ``PYDSTACK_LOOP=asyncio``
picks the stock loop (to rule uvloop out when chasing a bug).

Usage (at an entry point, instead of ``asyncio.run``)::

    from pydstack.loop import run
    code = run(plane.run())
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's ``new_event_loop``, or None (the stock loop) without uvloop or when asked."""
    if os.environ.get("PYDSTACK_LOOP", "") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)`` on the loop `loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)
