"""A KMS process killed mid-request, and a replica onboarded from a running instance."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from pydstack.actors.kms import (
    DevBackend,
    KmsCallError,
    KmsClient,
    KmsService,
    KmsSettings,
    WebhookBackend,
    onboard_replica,
    serve_kms,
)
from pydstack.adapters.nats import EventStore, NatsServer
from pydstack.adapters.secretfile import write_secret
from pydstack.adapters.tdx.pki import DevPki
from pydstack.core.events import (
    BootInfo,
    KeyDenied,
    KeyIssued,
    KeyRequested,
    KmsReplicaOnboarded,
    decode_body,
    open_envelope,
)
from pydstack.core.kms import ABANDONED, fold, undecided
from pydstack_guest import create_dev_app_keys
from tests import images

from .conftest import CLUSTER, VM_CONFIG, Kms, Webhook, bound_identity, kms_guest, make_cvm


async def _start(args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    seed = Path(args[args.index("--key-file") + 1]).parent / "kms-identity.seed"
    if not seed.exists():  # the KMS signs with a keyring identity's seed, never a random key
        write_secret(seed, os.urandom(32).hex())
    proc = subprocess.Popen(
        [sys.executable, "-m", "pydstack.actors.kms", *args, "--signer-seed-file", str(seed)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    assert line.startswith(b"KMS_URL="), line
    return proc, line.decode().strip().split("=", 1)[1]


async def _kms_events(store: EventStore) -> list[object]:
    records, _ = await store.read_aggregate(f"dstack.kms.{CLUSTER}")
    return [decode_body(open_envelope(r.data)) for r in records]


@pytest.mark.timeout(90)
async def test_kill_mid_request_leaves_no_half_decision(
    nats_server: NatsServer, store: EventStore, pki: DevPki, tmp_path: Path
) -> None:
    """SIGKILL while the backend is deciding: the request's KeyRequested is on the log with
    no decision. The restarted KMS closes it (KeyDenied, abandoned) before serving; the retried
    request is decided once, as a complete pair; a second restart adds nothing."""
    hold = asyncio.Event()
    arrived = asyncio.Event()

    async def boot_auth(request: web.Request) -> web.Response:
        arrived.set()
        await hold.wait()
        return web.json_response({"isAllowed": True, "reason": "", "gatewayAppId": ""})

    async def kms_auth(request: web.Request) -> web.Response:  # the KMS asks about itself
        return web.json_response({"isAllowed": True, "reason": "", "gatewayAppId": ""})

    app = web.Application()
    app.router.add_post("/bootAuth/app", boot_auth)
    app.router.add_post("/bootAuth/kms", kms_auth)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    pki.save(tmp_path / "pki")
    _, text = create_dev_app_keys(b"\x42" * 20, now=0)
    (tmp_path / "appkeys.json").write_text(text)
    args = [
        "--nats", nats_server.url, "--cluster", CLUSTER, "--port", "0", "--key-file",
        str(tmp_path / "root.sealed"), "--seal-appkeys", str(tmp_path / "appkeys.json"),
        "--auth", "webhook", "--auth-url", hook, "--dev-pki", str(tmp_path / "pki"),
    ]  # fmt: skip
    await images.register_test_image(store)
    proc, url = await _start(args)
    cvm = make_cvm(pki)
    try:
        async with KmsClient(url, dev_pki=pki) as c:
            temp = await c.call("GetTempCaCert")
        identity = await bound_identity(cvm, temp)
        body = {"api_version": 1, "vm_config": VM_CONFIG}

        async def ask() -> dict[str, object]:
            async with KmsClient(url, ca_pem=temp["ca_cert"], identity=identity) as c:
                return await c.call("GetAppKey", body)

        pending = asyncio.create_task(ask())
        await asyncio.wait_for(arrived.wait(), 20)
        # The request is stored while the backend decides: wait until it is, then kill.
        for _ in range(200):
            if any(isinstance(e, KeyRequested) for e in await _kms_events(store)):
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with pytest.raises(Exception):  # noqa: B017 - any transport error: the server died
            await pending
        evs = await _kms_events(store)
        cut = [e for e in evs if isinstance(e, KeyRequested)]
        assert len(cut) == 1 and not [e for e in evs if isinstance(e, KeyIssued | KeyDenied)]
        assert fold(evs).open_requests == {cut[0].request_id}
        hold.set()
        proc, url = await _start(args)
        # Before it serves anything, the restarted KMS has decided the request it was cut off in.
        evs = await _kms_events(store)
        closed = [e for e in evs if isinstance(e, KeyDenied)]
        assert [(d.request_id, d.reason) for d in closed] == [(cut[0].request_id, ABANDONED)]
        assert not fold(evs).open_requests
        async with KmsClient(url, ca_pem=temp["ca_cert"], identity=identity) as c:
            keys = await c.call("GetAppKey", body)
        assert keys["k256_key"]
        evs = await _kms_events(store)
        types = [type(e).__name__ for e in evs]
        assert types[-4:] == ["KeyRequested", "KeyDenied", "KeyRequested", "KeyIssued"]
        state = fold(evs)
        assert state.issued == 1 and state.denied == 1
        assert not state.open_requests and not state.duplicates
        assert state.root is not None  # the same root survived the restart (sealed file)
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        proc, url = await _start(args)  # nothing left to close: the log is unchanged
        assert await _kms_events(store) == evs
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        await runner.cleanup()


def test_only_own_undecided_requests_are_closed() -> None:
    """A restarting KMS closes what it logged and never decided, not another replica's
    in-flight requests nor anything already decided."""
    mine, theirs, done = (KeyRequested(request_id=r, app_id="a") for r in ("r1", "r2", "r3"))
    entries = [
        ("kms-a", mine), ("kms-b", theirs), ("kms-a", done),
        ("kms-a", KeyIssued(request_id="r3", boot_info=BootInfo(tcb_status="UpToDate"),
                            quote_hash="", backend="dev")),
    ]  # fmt: skip
    assert undecided(entries, "kms-a") == [mine]
    assert undecided(entries, "kms-b") == [theirs]
    assert undecided([*entries, ("kms-b", KeyDenied(request_id="r2", reason="x"))], "kms-b") == []


def test_replicas_sharing_an_identity_close_only_their_own() -> None:
    """Hosts that copied one data dir's identities sign as the same actor: the instance id
    (each `up`'s host id) tells their requests apart."""
    on_a = KeyRequested(request_id="r1", app_id="a", kms_instance="ha")
    on_b = KeyRequested(request_id="r2", app_id="a", kms_instance="hb")
    entries = [("kms", on_a), ("kms", on_b)]
    assert undecided(entries, "kms", "ha") == [on_a]
    assert undecided(entries, "kms", "hb") == [on_b]
    assert undecided(entries, "kms") == []  # an instance without an id takes neither


async def test_restart_closes_only_its_own_cut_off_requests(
    kms: Kms, pki: DevPki, store: EventStore, nats_server: NatsServer
) -> None:
    """Two requests this instance logged in a previous life are closed together when it
    starts again; a request another KMS logged (maybe in flight) is left to that KMS."""
    from pydstack.adapters.nats.store import Version
    from pydstack.core.events import Signer, message_hash

    subj = f"dstack.kms.{CLUSTER}"

    async def version() -> Version:
        last = await store.last_by_subject(subj)
        assert last is not None
        return Version(last.seq, message_hash(last.data))

    mine = [KeyRequested(request_id=r, app_id="ab" * 20, method="GetAppKey",
                         kms_instance="kms-a") for r in ("r1", "r2")]  # fmt: skip
    # A replica sharing this identity (same actor) but another instance: not ours to close.
    twin = KeyRequested(request_id="r4", app_id="ab" * 20, kms_instance="kms-b")
    await store.append(subj, [*mine, twin], await version())
    other = Signer.from_private_bytes("kms-other", os.urandom(32))
    async with await EventStore.connect(nats_server.url, other) as s2:
        await s2.append(subj, [KeyRequested(request_id="r3", app_id="cd" * 20)], await version())
    # The same instance started again: same root, same store identity (actor).
    again = KmsService(
        store, KmsSettings(cluster=CLUSTER, root_ca_der=pki.root_der, instance_id="kms-a"),
        backend=DevBackend(enabled=True), collateral=kms.collateral, root=kms.svc.root,
        created=kms.svc.created,
    )  # fmt: skip
    async with again:
        evs = await kms.events()
    denied = [(e.request_id, e.reason) for e in evs if isinstance(e, KeyDenied)]
    assert denied == [("r1", ABANDONED), ("r2", ABANDONED)]
    assert fold(evs).open_requests == {"r3", "r4"} and not fold(evs).duplicates
    async with again:  # started once more: nothing left of its own to close
        assert await kms.events() == evs


async def test_replica_onboards_and_answers_identically(
    kms: Kms, pki: DevPki, tmp_path: Path, store: EventStore
) -> None:
    """Replica B gets the root over mutual RA-TLS; A and B derive the same keys for an app."""
    agent_b, keyfile_b = kms_guest(pki, tmp_path, "kms-b")
    with pytest.raises(Exception, match="onboard"):
        await KmsService.open(
            store, KmsSettings(cluster=CLUSTER, root_ca_der=pki.root_der),
            backend=DevBackend(enabled=True), collateral=kms.collateral, keyfile=keyfile_b,
        )  # fmt: skip
    backend_b = DevBackend(enabled=True)
    await onboard_replica(
        store, CLUSTER, source_url=kms.url, attester=agent_b, backend=backend_b,
        collateral=kms.collateral, keyfile=keyfile_b, root_ca_der=pki.root_der,
        vm_config=VM_CONFIG,
    )  # fmt: skip
    assert os.stat(keyfile_b.path).st_mode & 0o777 == 0o600
    evs = await kms.events()
    onboarded = [e for e in evs if isinstance(e, KmsReplicaOnboarded)]
    assert len(onboarded) == 1 and onboarded[0].boot_info is not None
    assert onboarded[0].replica_id == hashlib.sha256(b"kms-b").digest()[:20].hex()
    assert isinstance(kms.svc.backend, WebhookBackend)
    svc_b = await KmsService.open(
        store, KmsSettings(cluster=CLUSTER, root_ca_der=pki.root_der, instance_id="kms-b"),
        backend=WebhookBackend(kms.svc.backend.url), collateral=kms.collateral,
        keyfile=keyfile_b, attester=agent_b,
    )  # fmt: skip
    cvm = make_cvm(pki)
    async with svc_b, serve_kms(svc_b) as url_b:
        answers = []
        for url in (kms.url, url_b):
            async with KmsClient(url, dev_pki=pki) as c:
                temp = await c.call("GetTempCaCert")
                meta = await c.call("GetMeta")
            identity = await bound_identity(cvm, temp)
            async with KmsClient(url, ca_pem=temp["ca_cert"], identity=identity) as c:
                answers.append((await c.call("GetAppKey", {"vm_config": VM_CONFIG}), temp, meta))
    assert answers[0] == answers[1]
    issued = [e for e in await kms.events() if isinstance(e, KeyIssued)]
    assert len(issued) == 3  # onboarding + one GetAppKey per replica, all on the one subject
    await svc_b.backend.close()  # type: ignore[attr-defined]


async def test_replica_refused_when_backend_denies_kms(
    kms: Kms, pki: DevPki, tmp_path: Path, store: EventStore, webhook: Webhook
) -> None:
    """The source's backend decides whether a KMS may join; the refusal is on the log."""
    webhook.config["kms"] = {"allowAny": False}
    agent_c, keyfile_c = kms_guest(pki, tmp_path, "kms-c")
    with pytest.raises(KmsCallError, match="KMS not allowed"):
        await onboard_replica(
            store, CLUSTER, source_url=kms.url, attester=agent_c,
            backend=DevBackend(enabled=True), collateral=kms.collateral, keyfile=keyfile_c,
            root_ca_der=pki.root_der,
        )  # fmt: skip
    assert not keyfile_c.exists()
    state = fold(await kms.events())
    assert state.denied == 1 and not state.replicas
