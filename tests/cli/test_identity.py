"""Per-actor identities: one seed signs events and logs in to NATS; the server enforces roles."""

from __future__ import annotations

import asyncio
import base64
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import nkeys
import pytest

from pydstack.adapters.nats import (
    EventStore,
    NatsServer,
    NatsServerConfig,
    PermissionDenied,
    StreamSettings,
)
from pydstack.adapters.nats.identity import IdentityStore, inbox_prefix, load_keyring, nats_user
from pydstack.core.events import KmsRootCreated, VmRejected, open_envelope, seal


def test_identities_are_private_files_and_the_keyring_is_public(tmp_path: Path) -> None:
    ids = IdentityStore(tmp_path / "identities")
    sched = ids.ensure("scheduler", "scheduler")
    assert stat.S_IMODE(ids.path("scheduler").stat().st_mode) == 0o600
    assert ids.ensure("scheduler", "scheduler") == sched  # stable across runs
    ring = load_keyring(ids.keyring_path)
    assert ring[sched.key].actor == "scheduler"
    assert ring[sched.key].subjects == ("dstack.vm.*", "dstack.host.*")
    assert sched.seed not in ids.keyring_path.read_text()


def test_the_envelope_key_is_the_nkey_public_key(tmp_path: Path) -> None:
    ident = IdentityStore(tmp_path).ensure("kms", "kms")
    event = KmsRootCreated(cluster="c", ca_public_key=b"", k256_public_key=b"")
    data = seal(
        ident.signer, event, subject="dstack.kms.c", event_id="e", time_ns=1, correlation="c"
    )
    nkey_pub = nkeys.from_seed(ident.seed.encode()).public_key.decode()
    # The public nkey is base32(prefix || key || crc16): the envelope key sits inside it.
    raw = base64.b32decode(nkey_pub + "=" * (-len(nkey_pub) % 8))
    assert open_envelope(data).key == raw[1:33] == ident.key


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[NatsServer, IdentityStore]]:
    ids = IdentityStore(tmp_path / "identities")
    users = [
        nats_user(ids.ensure(n, r))
        for n, r in (("admin", "admin"), ("scheduler", "scheduler"), ("operator", "operator"))
    ]
    async with NatsServer(NatsServerConfig(data_dir=tmp_path / "nats", users=users)) as server:
        admin = ids.load("admin")
        assert admin is not None
        settings = StreamSettings(deny_delete=False)  # even then, only admin may delete
        async with await EventStore.connect(
            server.url, admin.signer, nkey_seed=admin.seed, settings=settings
        ) as store:
            await store.ensure_stream()
        yield server, ids


async def test_an_actor_may_append_to_its_own_subjects(
    secured: tuple[NatsServer, IdentityStore],
) -> None:
    server, ids = secured
    sched = ids.load("scheduler")
    assert sched is not None
    async with await EventStore.connect(server.url, sched.signer, nkey_seed=sched.seed) as store:
        version = await store.append("dstack.vm.v1", [VmRejected(vm_id="v1", reason="x")], 0)
        [rec], _ = await store.read_aggregate("dstack.vm.v1")
        assert rec.seq == version.seq and open_envelope(rec.data).actor == "scheduler"


async def test_a_forbidden_publish_is_refused_by_the_server(
    secured: tuple[NatsServer, IdentityStore],
) -> None:
    server, ids = secured
    sched = ids.load("scheduler")
    assert sched is not None
    async with await EventStore.connect(server.url, sched.signer, nkey_seed=sched.seed) as store:
        store.timeout = 1.0
        with pytest.raises(PermissionDenied, match=r"dstack\.kms\.x refused by the server"):
            await store.append("dstack.kms.x", [VmRejected(vm_id="x", reason="x")], 0)
        assert await store.last_seq() == 0  # nothing was stored


async def test_an_actor_cannot_delete_the_stream_or_a_message(
    secured: tuple[NatsServer, IdentityStore],
) -> None:
    server, ids = secured
    oper = ids.load("operator")
    assert oper is not None
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(  # replies come on its own inbox only
        server.url,
        nkeys_seed_str=oper.seed,
        error_cb=on_error,
        inbox_prefix=inbox_prefix(oper.nkey),
    )
    try:
        js = nc.jetstream(timeout=1.0)
        await js.publish("dstack.vm.a", b"whatever")  # its own subject: accepted
        with pytest.raises(nats.errors.TimeoutError):
            await js.delete_stream("DSTACK")
        with pytest.raises(nats.errors.TimeoutError):
            await js.delete_msg("DSTACK", 1)
        await asyncio.sleep(0.1)
        # (nats-py lower-cases the server's error text)
        assert any('publish to "$js.api.stream.delete.dstack"' in e for e in errors), errors
        assert any('publish to "$js.api.stream.msg.delete.dstack"' in e for e in errors), errors
        info = await js.stream_info("DSTACK")
        assert info.state.messages == 1
    finally:
        await nc.close()
