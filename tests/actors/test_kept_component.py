"""upkeep.KeptComponent: a component of `up` rebuilt in place when it fails (issue 17)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from pydstack.upkeep import Crashing, Failed, KeptComponent, RestartBudget, Restarted


class Flaky:
    """Instances that fail when told; records what was opened and closed."""

    def __init__(self, open_failures: int = 0) -> None:
        self.opened = 0
        self.closed = 0
        self.open_failures = open_failures
        self.fail_now: asyncio.Event = asyncio.Event()

    async def open(self, stack: contextlib.AsyncExitStack) -> Failed:
        if self.open_failures:
            self.open_failures -= 1
            raise OSError("port busy")
        self.opened += 1
        self.fail_now = asyncio.Event()
        event = self.fail_now

        async def close() -> None:
            self.closed += 1

        stack.push_async_callback(close)

        async def failed() -> str:
            await event.wait()
            raise RuntimeError(f"instance {self.opened} broke")

        return failed


def _budget() -> RestartBudget:
    return RestartBudget(limit=3, window_s=60, first_delay_s=0.01, max_delay_s=0.02)


async def _until(check: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(5):  # polled: the watch has no hook for tests to wait on
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_a_failed_instance_is_closed_and_a_new_one_opened_then_reported() -> None:
    flaky, seen = Flaky(), list[Restarted]()
    kept = KeptComponent("gateway", flaky.open, _budget(), seen.append)
    await kept.start()
    watch = kept.watching()
    flaky.fail_now.set()
    await _until(lambda: flaky.opened == 2, "a second instance")
    assert flaky.closed == 1
    [event] = seen
    assert (event.component, event.reason, event.recent) == (
        "gateway", "RuntimeError: instance 1 broke", 1,
    )  # fmt: skip
    await kept.aclose()
    assert watch.cancelled() and flaky.closed == 2  # the running instance closed at stop


async def test_failures_to_reopen_count_and_exhaust_the_budget_naming_the_component() -> None:
    flaky = Flaky()
    kept = KeptComponent("scheduler", flaky.open, _budget())
    await kept.start()
    watch = kept.watching()
    flaky.open_failures = 99  # every reopen fails
    flaky.fail_now.set()
    with pytest.raises(Crashing, match=r"^scheduler failed 3 times within 60s \(last: "
                                       r"restart failed: port busy\)"):  # fmt: skip
        await watch
    assert flaky.opened == 1 and flaky.closed == 1
    await kept.aclose()


async def test_a_failed_first_start_closes_what_it_opened() -> None:
    opened: list[str] = []

    async def open(stack: contextlib.AsyncExitStack) -> Failed:
        stack.callback(opened.append, "closed")
        raise OSError("no")

    kept = KeptComponent("kms", open, _budget())
    with pytest.raises(OSError):
        await kept.start()
    assert opened == ["closed"]
