"""Attack: one host's key acts beyond its host, or any role meddles with others' consumers.

Before, every joining host held every seed (admin's included), every VMM key could publish
on every ``dstack.host.*``, and every role, the read-only auditor included, could create,
delete, pull from and ack any durable consumer and subscribe to every ``_INBOX``. Now a host
gets its own key (``pydstack host add``), bound on the keyring to its host only; NATS users
come from the keyring (``identity.nats_users``): ``dstack.host.<its host>`` only, its own
durable consumers only, replies on its own ``_INBOX.<nkey>`` only; the folds refuse what got
through by another route; ``host remove`` revokes it (its later events refused, its earlier
ones valid, and the server logs it out); its join bundle holds no seed but its own. All on a
real nats-server with the generated permissions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import stat
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from pydstack.actors.hosts import add_host, read_keyring, remove_host
from pydstack.actors.trust import Judge, ensure_keyring
from pydstack.adapters.nats import (
    EventStore,
    NatsServer,
    NatsServerConfig,
    PermissionDenied,
    Recorded,
    StreamSettings,
)
from pydstack.adapters.nats.identity import Identity, IdentityStore, nats_users
from pydstack.core.events import HostHeartbeat, HostJoined, seal
from pydstack.core.policy import HOST_BOUND, Keyring
from tests.cli.harness import Up, cli

STANDARD = [(r, r) for r in ("admin", "operator", "scheduler", "vmm", "kms", "gateway", "auditor")]


@dataclass
class Cluster:
    server: NatsServer
    ids: dict[str, Identity]
    admin: EventStore
    h2: Identity  # host h2's own VMM key, minted by `host add`

    async def connect(self, ident: Identity) -> EventStore:
        store = await EventStore.connect(
            self.server.url, ident.signer, nkey_seed=ident.seed, anchor=self.ids["admin"].key
        )
        store.timeout = 1.0
        return store

    async def sync_users(self) -> None:
        ring, _ = await read_keyring(self.admin)
        self.server.reload(nats_users(ring, self.ids.values(), host="h1"))
        await asyncio.sleep(0.3)  # the server reloads its config on SIGHUP


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    ids = IdentityStore(tmp_path / "identities").ensure_all(STANDARD)
    users = nats_users(Keyring(), ids.values(), host="h1")
    async with NatsServer(NatsServerConfig(data_dir=tmp_path / "nats", users=users)) as server:
        admin = await EventStore.connect(
            server.url, ids["admin"].signer, nkey_seed=ids["admin"].seed,
            settings=StreamSettings(), anchor=ids["admin"].key,
        )  # fmt: skip
        async with admin:
            await admin.ensure_stream()
            await ensure_keyring(admin, [
                (i.key, i.name, i.role, ("h1",) if i.role in HOST_BOUND else ())
                for i in ids.values()
            ])  # fmt: skip
            [h2] = await add_host(admin, "h2")
            c = Cluster(server, ids, admin, h2)
            await c.sync_users()
            yield c


def _violations(errors: list[str], what: str) -> bool:
    return any("permissions violation" in e and what in e for e in errors)


@contextlib.asynccontextmanager
async def _raw(c: Cluster, ident: Identity) -> AsyncIterator[tuple[Client, list[str]]]:
    """A plain NATS connection with ``ident``'s nkey, and the errors the server sends it
    (lower-cased, as they arrive); closed at exit."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = await nats.connect(c.server.url, nkeys_seed_str=ident.seed, error_cb=on_error)
    try:
        yield nc, errors
    finally:
        await nc.close()


async def _scheduler_consumer(c: Cluster) -> None:
    """The scheduler's durable consumer, created by the scheduler (as its actor does)."""
    async with await c.connect(c.ids["scheduler"]) as sched:
        sub = await sched.durable("scheduler", ["dstack.vm.*"])
        await sub.unsubscribe()


async def test_a_host_key_cannot_write_another_hosts_subject_and_the_folds_refuse_it(
    cluster: Cluster,
) -> None:
    """h2's key may append to dstack.host.h2; NATS refuses dstack.host.h1, and the same
    event stored there by another route (admin's connection) is refused by the folds."""
    async with await cluster.connect(cluster.h2) as h2:
        own = HostJoined(host_id="h2", vcpu=2, memory_mb=1024, address="b")
        await h2.append("dstack.host.h2", [own], 0)
        with pytest.raises(PermissionDenied, match=r"dstack\.host\.h1"):
            await h2.append("dstack.host.h1", [HostHeartbeat(host_id="h1", running_vms=1)], 0)
    # by another route: sealed with h2's key, published by admin
    forged = seal(cluster.h2.signer, HostHeartbeat(host_id="h1", running_vms=2),
                  subject="dstack.host.h1", event_id=os.urandom(8).hex(), time_ns=2,
                  correlation="c")  # fmt: skip
    ack = await cluster.admin.js.publish("dstack.host.h1", forged)
    judge = Judge("test-h1-view", cluster.ids["admin"].key)
    assert await judge.admit_read(cluster.admin, ack.seq, "dstack.host.h1", forged) is None
    assert judge.refused[ack.seq].reason == "not-owner"


async def test_a_host_key_cannot_delete_the_schedulers_consumer(cluster: Cluster) -> None:
    await _scheduler_consumer(cluster)
    async with _raw(cluster, cluster.h2) as (nc, errors):
        js = nc.jetstream(timeout=1.0)
        with pytest.raises(nats.errors.TimeoutError):
            await js.delete_consumer("DSTACK", "scheduler")
        await asyncio.sleep(0.1)
        assert _violations(errors, "$js.api.consumer.delete.dstack.scheduler"), errors
        # nor create one under the scheduler's name, nor pull from it
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request("$JS.API.CONSUMER.MSG.NEXT.DSTACK.scheduler", b"1", timeout=1.0)
    info = await cluster.admin.js.consumer_info("DSTACK", "scheduler")
    assert info.name == "scheduler"


async def test_a_host_key_cannot_rewrite_the_schedulers_consumer_through_the_unnamed_api(
    cluster: Cluster,
) -> None:
    """$JS.API.CONSUMER.CREATE.<stream> (no name in the subject) updates whatever consumer its
    body names: allowed for ordered readers, it let any key empty the scheduler's filter."""
    await _scheduler_consumer(cluster)
    async with _raw(cluster, cluster.h2) as (nc, errors):
        body = {"stream_name": "DSTACK", "action": "update",
                "config": {"name": "scheduler", "filter_subject": "dstack.nothing",
                           "deliver_policy": "all", "ack_policy": "explicit"}}  # fmt: skip
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request("$JS.API.CONSUMER.CREATE.DSTACK", json.dumps(body).encode(), 1.0)
        await asyncio.sleep(0.1)
        assert _violations(errors, '"$js.api.consumer.create.dstack"'), errors
    info = await cluster.admin.js.consumer_info("DSTACK", "scheduler")
    assert info.config.filter_subjects == ["dstack.vm.*"] or info.config.filter_subject == (
        "dstack.vm.*"
    )
    # and the reads a host needs still work without any consumer
    async with await cluster.connect(cluster.h2) as h2:
        assert [r.seq async for r in h2.read()]
        assert [r.seq async for r in h2.read(subject="dstack.keyring.*", from_time=0.0)]


async def test_a_host_key_cannot_read_another_roles_inbox(cluster: Cluster) -> None:
    """The scheduler's replies come on _INBOX.<its nkey>.>; h2 may not subscribe there
    (nor to _INBOX.> as a whole), so it cannot read what the server answers the scheduler."""
    sched = cluster.ids["scheduler"]
    async with _raw(cluster, cluster.h2) as (nc, errors):
        got: list[bytes] = []

        async def cb(msg: Msg) -> None:
            got.append(msg.data)

        await nc.subscribe(f"_INBOX.{sched.nkey}.>", cb=cb)
        await nc.subscribe("_INBOX.>", cb=cb)
        await nc.flush()
        async with await cluster.connect(sched) as store:
            assert store.nc._inbox_prefix.decode() == f"_INBOX.{sched.nkey}"
            await store.read_aggregate("dstack.host.h1")  # replies on its own inbox: works
            await cluster.admin.nc.publish(f"_INBOX.{sched.nkey}.x", b"secret")
        await asyncio.sleep(0.3)
        assert got == []
        assert _violations(errors, f'subscription to "_inbox.{sched.nkey.lower()}.>"'), errors


async def test_the_auditor_reads_but_cannot_create_or_delete_a_durable_consumer(
    cluster: Cluster,
) -> None:
    await _scheduler_consumer(cluster)
    auditor = cluster.ids["auditor"]
    async with await cluster.connect(auditor) as store:  # reading and following work
        assert [r.seq async for r in store.read()]
        last = await store.last_seq()
        follower = cast(AsyncGenerator[Recorded, None], store.read(from_seq=last + 1, follow=True))
        first = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0.2)
        async with await cluster.connect(cluster.h2) as h2:
            joined = HostJoined(host_id="h2", vcpu=1, memory_mb=1, address="b")
            await h2.append("dstack.host.h2", [joined], 0)
        assert (await asyncio.wait_for(first, 5)).subject == "dstack.host.h2"
        await follower.aclose()
        with pytest.raises(Exception):  # noqa: B017 - a timeout or the server's refusal
            await store.durable("auditor", ["dstack.>"])
    async with _raw(cluster, auditor) as (nc, errors):
        js = nc.jetstream(timeout=1.0)
        with pytest.raises(nats.errors.TimeoutError):
            await js.delete_consumer("DSTACK", "scheduler")
        await asyncio.sleep(0.1)
        assert _violations(errors, "$js.api.consumer.delete.dstack.scheduler"), errors
    assert (await cluster.admin.js.consumer_info("DSTACK", "scheduler")).name == "scheduler"


async def test_a_removed_hosts_new_events_are_refused_and_its_past_events_still_count(
    cluster: Cluster,
) -> None:
    async with await cluster.connect(cluster.h2) as h2:
        joined = HostJoined(host_id="h2", vcpu=2, memory_mb=1024, address="b")
        v = await h2.append("dstack.host.h2", [joined], 0)
    await remove_host(cluster.admin, "h2")
    await cluster.sync_users()
    # NATS logs it out: its login is refused now
    with pytest.raises(Exception):  # noqa: B017 - nats-py's authorization error
        await nats.connect(
            cluster.server.url, nkeys_seed_str=cluster.h2.seed, allow_reconnect=False,
            max_reconnect_attempts=0, connect_timeout=1,
        )  # fmt: skip
    # by another route: a heartbeat it signed after its removal
    beat = HostHeartbeat(host_id="h2", running_vms=3)
    late = seal(cluster.h2.signer, beat, subject="dstack.host.h2", event_id=os.urandom(8).hex(),
                time_ns=3, correlation="c")  # fmt: skip
    ack = await cluster.admin.js.publish("dstack.host.h2", late)
    recs, _ = await cluster.admin.read_aggregate("dstack.host.h2")
    judge = Judge("test-removed", cluster.ids["admin"].key)
    admitted = await judge.admitted(cluster.admin, recs)
    assert [a.event for a in admitted if a.event is not None] == [
        HostJoined(host_id="h2", vcpu=2, memory_mb=1024, address="b")
    ]
    assert [r.seq for r in recs] == [v.seq, ack.seq]
    assert judge.refused[ack.seq].reason == "revoked-signer"


def test_a_join_bundle_holds_no_seed_but_its_own(tmp_path: Path) -> None:
    """`pydstack host add h2` against a running `up`: the bundle is 0600 and its bytes hold
    h2's seed and none of the data dir's (admin's included), in any encoding."""
    home = tmp_path / "home"
    up = Up(home, extra=("--no-kms", "--dashboard-port", "-1")).start()
    try:
        out = tmp_path / "h2.bundle"
        r = cli(home, "host", "add", "h2", "--gateway", "--out", str(out))
        assert r.code == 0, r.out + r.err
        data = out.read_bytes()
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        ids = IdentityStore(home / "identities").all()
        assert ids and {i.name for i in ids} >= {"admin", "vmm", "scheduler"}
        for i in ids:
            for form in (i.seed.encode(), i.raw_seed.hex().encode(), i.raw_seed):
                assert form not in data, f"{i.name}'s seed is in the bundle"
        seeds = re.findall(rb"SU[A-Z2-7]{56}", data)
        assert len(seeds) == 2  # h2's VMM key and its gateway key
        assert b"PRIVATE" not in data  # no PKI key either
    finally:
        assert up.stop() == 0
