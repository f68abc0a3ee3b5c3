"""SignCert grants: one decision per (app, instance, compose hash, usage) and window."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
import pytest

from pydstack.actors.kms.certgrants import (
    CertGrants,
    Grant,
    RateLimited,
    grant_key,
    grants_on_log,
    usage_of,
)
from pydstack.core.events import BootInfo, KeyDenied, KeyIssued, KeyRequested

BOOT = BootInfo(tcb_status="UpToDate", app_id="aa" * 20, instance_id="bb" * 20,
                compose_hash="cc" * 32, mr_aggregated="dd" * 32)  # fmt: skip
KEY = grant_key(BOOT, "client")


def issued(rid: str, boot: BootInfo = BOOT) -> KeyIssued:
    return KeyIssued(request_id=rid, boot_info=boot, quote_hash="q", backend="log")


async def test_one_decision_for_concurrent_requests_then_reuse_within_the_window() -> None:
    """50 concurrent requests of one key make one decision; later ones reuse it until the
    window ends, then a new decision is made."""
    grants = CertGrants(issued_ttl=100)
    calls: list[int] = []

    async def decide() -> Grant:
        calls.append(1)
        await asyncio.sleep(0.01)
        return Grant(f"r{len(calls)}", 1000, issued(f"r{len(calls)}"))

    out = await asyncio.gather(*(grants.decide(KEY, BOOT, 1000, decide) for _ in range(50)))
    assert {g.request_id for g in out} == {"r1"} and len(calls) == 1
    assert (await grants.decide(KEY, BOOT, 1099, decide)).request_id == "r1"
    assert (await grants.decide(KEY, BOOT, 1100, decide)).request_id == "r2"


async def test_other_measurements_get_their_own_decision_up_to_the_bound() -> None:
    """Another BootInfo of the same key is decided anew (a TCB status that changed), at most
    `per_window` decisions in a window; beyond, 429 until the oldest expires."""
    grants = CertGrants(issued_ttl=100, per_window=2)
    ids = iter(["r1", "r2", "r3"])

    def decider(boot: BootInfo, at: int) -> Callable[[], Awaitable[Grant]]:
        async def decide() -> Grant:
            rid = next(ids)
            return Grant(rid, at, issued(rid, boot))

        return decide

    other = msgspec.structs.replace(BOOT, tcb_status="OutOfDate")
    third = msgspec.structs.replace(BOOT, os_image_hash="ee" * 32)
    assert (await grants.decide(KEY, BOOT, 1000, decider(BOOT, 1000))).request_id == "r1"
    assert (await grants.decide(KEY, other, 1010, decider(other, 1010))).request_id == "r2"
    assert (await grants.decide(KEY, BOOT, 1020, decider(BOOT, 1020))).request_id == "r1"
    with pytest.raises(RateLimited) as e:
        await grants.decide(KEY, third, 1020, decider(third, 1020))
    assert e.value.retry_after == 80
    assert (await grants.decide(KEY, third, 1100, decider(third, 1100))).request_id == "r3"


async def test_a_failed_decision_is_not_a_grant() -> None:
    grants = CertGrants()

    async def broken() -> Grant:
        raise ConnectionError("store down")

    with pytest.raises(ConnectionError):
        await grants.decide(KEY, BOOT, 1000, broken)
    assert grants.current(KEY, 1000) == []


def test_grants_are_read_back_from_the_log() -> None:
    """After a restart the newest SignCert decision per key counts; other methods and
    requests without a usage do not."""
    events = [
        KeyRequested(
            request_id="a", app_id=BOOT.app_id, method="SignCert", usage="client", verified_at=10
        ),
        issued("a"),
        KeyRequested(request_id="b", app_id=BOOT.app_id, method="GetAppKey", verified_at=20),
        issued("b"),
        KeyRequested(
            request_id="c", app_id=BOOT.app_id, method="SignCert", usage="server", verified_at=30
        ),
        KeyDenied(request_id="c", reason="no", boot_info=BOOT),
    ]
    got = grants_on_log(events)
    assert got.keys() == {KEY, grant_key(BOOT, "server")}
    assert [(g.request_id, g.decided_at) for g in got[KEY]] == [("a", 10)]
    assert isinstance(got[grant_key(BOOT, "server")][0].outcome, KeyDenied)
    grants = CertGrants()
    grants.load(got)
    assert [g.request_id for g in grants.current(KEY, 20)] == ["a"]


def test_usage_is_the_eku_flags() -> None:
    flags = ((True, False), (False, True), (True, True), (False, False))
    assert [usage_of(s, c) for s, c in flags] == [
        "server", "client", "server+client", "none"
    ]  # fmt: skip
