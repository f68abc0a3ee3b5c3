"""Attack: a writer puts on the log what its role may not write. A ``VmScheduled`` signed by an
unknown key, by a valid key of the wrong role (operator), by another host's VMM, or with a
zeroed signature used to be folded and acted on (the VMM's fold checked no signature at all):
the VMM started the CVM. Every fold now asks the same verdict (``pydstack.core.policy``)
against the keyring on the log, rooted in the pinned admin key: no actor acts, and ``audit``
names the sequence. A hypothesis test checks that the policy, every fold and the auditor
agree on any mix of writers (tenants included: the app owner rule), types, subjects and
corruptions (real NATS throughout)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pydstack.actors import Scheduler, SchedulerConfig, metrics
from pydstack.actors._placement_view import PlacementView
from pydstack.actors.dashboard import LiveState
from pydstack.actors.gateway.view import ClusterView
from pydstack.actors.kms.service import _load_state
from pydstack.actors.trust import Judge
from pydstack.actors.vmm._view import LogView
from pydstack.adapters.nats import (
    EventStore,
    NatsServer,
    NatsServerConfig,
    Recorded,
    StreamSettings,
    new_event_id,
)
from pydstack.adapters.sqlite import ReadModel
from pydstack.core.audit import Auditor
from pydstack.core.events import (
    AppRegistered,
    AppRemoved,
    AppUpgraded,
    CvmRegistered,
    Event,
    GatewayNodeJoined,
    HostJoined,
    HostVmPlaced,
    KeyRevoked,
    KeyringEntryAdded,
    KmsRootCreated,
    Signer,
    VmExited,
    VmRequested,
    VmResources,
    VmScheduled,
    VmStarted,
    VmStopRequested,
    message_hash,
    seal,
)
from pydstack.core.events import subject as subject_of
from pydstack.core.policy import KEYRING_SUBJECT, Allowed, Gate, Refused
from tests.adversarial.writers import forge, keyed_store, wanted
from tests.policy.given import (
    ADMIN,
    GATEWAY,
    KMS,
    OPERATOR,
    RES,
    SCHEDULER,
    STRANGER,
    TENANT_A,
    TENANT_B,
    VMM1,
    VMM2,
    entry,
)
from tests.vmm.conftest import VmmHost, compose, events_of, wait_until

ANCHOR = ADMIN.public_key
WANTED = wanted(ADMIN, OPERATOR, SCHEDULER, VMM1, VMM2, KMS, GATEWAY)


# -- the host: h1's VMM signs as VMM1; the keyring binds every role; no scheduler runs ----------


@pytest.fixture
def signer() -> Signer:
    return VMM1  # vmm_host's VMM writes with the `store` fixture: it is h1's VMM


@pytest.fixture
async def store(nats_server: NatsServer, signer: Signer) -> AsyncIterator[EventStore]:
    async with keyed_store(nats_server.url, signer, WANTED) as s:
        yield s


@pytest.fixture
async def scheduled() -> AsyncIterator[None]:
    yield  # no scheduler: the only placements are the ones a test appends


def requested(vm_id: str) -> VmRequested:
    return VmRequested(vm_id=vm_id, app_id="a" * 40, name=vm_id, host="h1",
                       compose=compose(vm_id).encode(), image="sandbox-busybox",
                       resources=VmResources(vcpu=1, memory_mb=256))  # fmt: skip


async def records(store: EventStore) -> list[Recorded]:
    return [r async for r in store.read()]


FORGERIES = {
    # name: (signer, zeroed signature, the verdict's reason)
    "unknown-key": (STRANGER, False, "unknown-signer"),
    "operator-role": (OPERATOR, False, "not-allowed"),
    "other-hosts-vmm": (VMM2, False, "not-allowed"),
    "zeroed-signature": (SCHEDULER, True, "bad-signature"),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
async def test_a_forged_vm_scheduled_is_acted_on_by_no_actor_and_audit_names_it(
    vmm_host: VmmHost, store: EventStore, nats_server: NatsServer, forgery: str
) -> None:
    by, zero, reason = FORGERIES[forgery]
    vm_id = f"forged-{forgery}"
    subj = subject_of("vm", vm_id)
    before = metrics.sample("pydstack_events_refused_total", {"actor": "vmm", "reason": reason})
    async with vmm_host.running() as (vmm, _):
        await forge(nats_server.url, OPERATOR, subj, requested(vm_id))
        seq = await forge(nats_server.url, by, subj, VmScheduled(vm_id=vm_id, host="h1", cid=1000),
                          zero_signature=zero)  # fmt: skip
        await wait_until(lambda: _at(vmm.view.cursor, seq), 10, "the VMM to fold the forgery")
        await vmm.pass_once()  # one more full pass: fold, observe, plan, act
        # the VMM: never planned, never started it
        assert not [a for a in vmm.actions if getattr(a, "vm_id", "") == vm_id]
        assert vm_id not in {st.vm_id for st in await vmm.backend.list()}
        assert vmm.view.vms[vm_id].vm.state == "requested"
        assert not [e for e in await events_of(store, vm_id) if isinstance(e, VmStarted)]
    after = metrics.sample("pydstack_events_refused_total", {"actor": "vmm", "reason": reason})
    assert after == before + 1
    recs = await records(store)
    # the scheduler still sees a VM nobody decided on (it would place it itself)
    async with await EventStore.connect(nats_server.url, SCHEDULER, anchor=ANCHOR) as ss:
        sched = Scheduler(ss, SchedulerConfig(name="scheduler-check"))
        await sched.catch_up()
        assert vm_id in sched.view.pending
    # the dashboard shows it requested, not scheduled
    live = LiveState()
    live.judge.pin(ANCHOR)
    live.apply(recs)
    assert live.proj.vms[vm_id].state == "requested"
    # audit names the sequence and why
    auditor = Auditor(anchor=ANCHOR, first_seq=1)
    findings = [f for r in recs for f in auditor.check(r.seq, r.subject, r.data)]
    assert auditor.refused == {seq: reason}
    assert any(f.seq == seq and f.severity == "error" for f in findings)


async def _at(cursor: int, seq: int) -> bool:
    return cursor >= seq


async def test_the_same_vm_scheduled_signed_by_the_scheduler_is_started(
    vmm_host: VmmHost, store: EventStore, nats_server: NatsServer
) -> None:
    """The control: the attack tests above would see a start (they fail on the old code)."""
    vm_id = "placed"
    subj = subject_of("vm", vm_id)
    async with vmm_host.running():
        await forge(nats_server.url, OPERATOR, subj, requested(vm_id))
        await forge(nats_server.url, SCHEDULER, subj, VmScheduled(vm_id=vm_id, host="h1", cid=1000))

        async def started() -> list[VmStarted]:
            return [e for e in await events_of(store, vm_id) if isinstance(e, VmStarted)]

        [ev] = await wait_until(started, 60, "the VMM to start it")
        assert ev.host == "h1"
    auditor = Auditor(anchor=ANCHOR, first_seq=1)
    for r in await records(store):
        auditor.check(r.seq, r.subject, r.data)
    assert auditor.refused == {}


# -- the policy, every fold and audit agree (hypothesis, real NATS) ------------------------------


@dataclass
class Env:
    loop: asyncio.AbstractEventLoop
    url: str
    store: EventStore

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    loop = asyncio.new_event_loop()
    server = NatsServer(NatsServerConfig(data_dir=tmp_path_factory.mktemp("nats")))
    loop.run_until_complete(server.__aenter__())
    settings = StreamSettings(deny_delete=False)
    store = loop.run_until_complete(
        EventStore.connect(server.url, ADMIN, settings=settings, anchor=ANCHOR)
    )
    loop.run_until_complete(store.ensure_stream())
    try:
        yield Env(loop, server.url, store)
    finally:
        loop.run_until_complete(store.close())
        loop.run_until_complete(server.__aexit__(None, None, None))
        loop.close()


SIGNERS = (ADMIN, OPERATOR, SCHEDULER, VMM1, VMM2, KMS, GATEWAY, TENANT_A, TENANT_B, STRANGER)
VMS, HOSTS = ("a", "b"), ("h1", "h2")


def _event(kind: str, agg: str, other: str, host: str) -> tuple[str, Event]:
    """One event of ``kind``; its body names ``other`` as the aggregate when they differ."""
    match kind:
        case "VmRequested":
            app = "b" if host == "h2" else "a"  # the app owner rule: whose app is it
            return f"dstack.vm.{agg}", VmRequested(vm_id=other, app_id=app, name="n",
                                                   resources=RES, host=host)  # fmt: skip
        case "VmScheduled":
            return f"dstack.vm.{agg}", VmScheduled(vm_id=other, host=host or "h1", cid=1000)
        case "VmStarted":
            return f"dstack.vm.{agg}", VmStarted(vm_id=other, host=host)
        case "VmStopRequested":
            return f"dstack.vm.{agg}", VmStopRequested(vm_id=other)
        case "VmExited":
            return f"dstack.vm.{agg}", VmExited(vm_id=other, reason="x")
        case "HostJoined":
            return f"dstack.host.{host or 'h1'}", HostJoined(host_id=host or "h1")
        case "HostVmPlaced":
            h = host or "h1"
            return f"dstack.host.{h}", HostVmPlaced(host_id=h, vm_id=other, cid=1000,
                                                    resources=RES)  # fmt: skip
        case "AppRegistered":
            return f"dstack.app.{agg}", AppRegistered(app_id=other, compose_hash="c")
        case "AppUpgraded":
            return f"dstack.app.{agg}", AppUpgraded(app_id=other, compose_hash="d",
                                                    previous_compose_hash="c")  # fmt: skip
        case "AppRemoved":
            return f"dstack.app.{agg}", AppRemoved(app_id=other)
        case "KmsRootCreated":
            return "dstack.kms.main", KmsRootCreated(cluster="main", ca_public_key=b"",
                                                     k256_public_key=b"")  # fmt: skip
        case "GatewayNodeJoined":
            return "dstack.gateway.default", GatewayNodeJoined(
                node_id="n1", wg_public_key="k", tunnel_ip="10.4.0.1", endpoint="e",
                base_domain="d")  # fmt: skip
        case "CvmRegistered":
            return f"dstack.cvm.{agg}", CvmRegistered(
                instance_id=agg, app_id="x", compose_hash="c", wg_public_key="k", tunnel_ip="t"
            )
        case "KeyringEntryAdded":  # binds the stranger, or moves h1's VMM to h2
            moved = KeyringEntryAdded(key=VMM1.public_key, name="vmm-h1", role="vmm",
                                      hosts=("h2",))  # fmt: skip
            return KEYRING_SUBJECT, entry(STRANGER, "operator") if other == agg else moved
        case _:  # KeyRevoked
            return KEYRING_SUBJECT, KeyRevoked(key=(VMM1 if other == agg else KMS).public_key)


KINDS = ("VmRequested", "VmScheduled", "VmStarted", "VmStopRequested", "VmExited",
         "HostJoined", "HostVmPlaced", "AppRegistered", "AppRegistered", "AppUpgraded",
         "AppRemoved", "KmsRootCreated", "GatewayNodeJoined",
         "CvmRegistered", "KeyringEntryAdded", "KeyRevoked")  # fmt: skip
writes = st.lists(
    st.tuples(
        st.sampled_from(SIGNERS),
        st.sampled_from(KINDS),
        st.sampled_from(VMS),
        st.sampled_from((*VMS, *VMS, "zz")),  # mostly the subject's own id
        st.sampled_from(("", *HOSTS)),
        st.sampled_from(("", "", "", "", "zero", "elsewhere")),  # corruption
    ),
    min_size=1,
    max_size=16,
)


async def _publish(env: Env, plan: list[tuple[Any, ...]], pre: int) -> list[Recorded]:
    js = env.store.js
    await js.delete_stream(env.store.stream)
    await env.store.ensure_stream()
    heads: dict[str, bytes] = {}

    async def put(by: Signer, subj: str, event: Event, how: str = "") -> None:
        stored_on = "dstack.vm.elsewhere" if how == "elsewhere" else subj
        data = seal(by, event, subject=subj, event_id=new_event_id(), time_ns=1,
                    correlation="c", prev=heads.get(stored_on, b""))  # fmt: skip
        if how == "zero":
            data = data[:-64] + bytes(64)
        heads[stored_on] = message_hash(data)
        await js.publish(stored_on, data)

    for i, w in enumerate(plan):
        if i == pre:  # some writes before the keyring (pre-keyring), the rest after it
            for e in [entry(ADMIN), *(entry(s) for s in SIGNERS[1:9])]:
                await put(ADMIN, KEYRING_SUBJECT, e)
        by, kind, agg, other, host, how = w
        subj, event = _event(kind, agg, other, host)
        await put(by, subj, event, how)
    return [r async for r in env.store.read()]


async def _folds(env: Env, recs: list[Recorded], tmp: Path) -> dict[str, Any]:
    """The refused sequences of each fold that acts, on the subjects it reads."""
    out: dict[str, Any] = {}
    view = LogView()  # the VMM
    view.judge.pin(ANCHOR)
    for r in recs:
        view.fold(r.seq, r.subject, r.data)
    out["vmm"] = set(view.judge.refused)
    placement = PlacementView(judge=Judge("scheduler", ANCHOR))
    placement.fold(recs)
    out["scheduler"] = set(placement.judge.refused)
    live = LiveState()
    live.judge.pin(ANCHOR)
    live.apply(recs)
    out["dashboard"] = set(live.judge.refused)
    cluster = ClusterView(env.store, "default")
    await cluster.catch_up()
    out["gateway"] = set(cluster.judge.refused)
    consumer = Judge("runtime", ANCHOR)  # a durable consumer's view: vm and host subjects only
    for r in recs:
        if r.subject.startswith(("dstack.vm.", "dstack.host.")):
            await consumer.admit_read(env.store, r.seq, r.subject, r.data)
    out["runtime"] = set(consumer.refused)
    kms = await _load_state(env.store, "dstack.kms.main")
    out["kms-root"] = kms.root is not None
    with ReadModel.open(tmp / f"rm-{time.monotonic_ns()}.db", anchor=ANCHOR) as rm:
        got = rm.apply_messages(recs)
        out["read-model"] = got.refused + got.malformed
    return out


def _owners_hold(recs: list[Recorded], verdicts: dict[int, Any]) -> None:
    """The app owner rule, as a model independent of the verdict's code: after the keyring,
    an allowed AppUpgraded/AppRemoved/AppRegistered of a registered app is its owner's (the
    signer of its first allowed AppRegistered) or admin's, one of an unregistered app only
    admin's; a tenant's allowed VmRequested names an app the tenant owns."""
    owner: dict[str, bytes] = {}
    for r in recs:
        v = verdicts[r.seq]
        if not isinstance(v, Allowed) or v.event is None:
            continue
        key, e = v.envelope.key, v.event
        if isinstance(e, AppRegistered | AppUpgraded | AppRemoved):
            app = r.subject.rsplit(".", 1)[1]
            if not v.pre_keyring and key != ADMIN.public_key:
                assert owner.get(app, key if isinstance(e, AppRegistered) else b"") == key, r.seq
            if isinstance(e, AppRegistered):
                owner.setdefault(app, key)
        elif isinstance(e, VmRequested) and v.signer is not None and v.signer.role == "tenant":
            assert owner.get(e.app_id) == key, r.seq


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(plan=writes, pre=st.integers(0, 3))
@example(  # tenants and owners: B and the operator upgrade A's app, B runs and stops A's VMs
    plan=[(TENANT_A, "AppRegistered", "a", "a", "", ""),
          (TENANT_B, "AppUpgraded", "a", "a", "", ""),
          (OPERATOR, "AppUpgraded", "a", "a", "", ""),
          (TENANT_B, "VmRequested", "a", "a", "", ""),
          (TENANT_A, "VmRequested", "b", "b", "", ""),
          (TENANT_B, "VmStopRequested", "b", "b", "", ""),
          (TENANT_A, "AppUpgraded", "a", "a", "", ""),
          (OPERATOR, "VmStopRequested", "b", "b", "", "")],
    pre=0,
)  # fmt: skip
def test_the_policy_every_fold_and_audit_agree(
    env: Env, tmp_path: Path, plan: list[tuple[Any, ...]], pre: int
) -> None:
    recs = env.run(_publish(env, plan, pre))
    gate = Gate.pinned(ANCHOR)
    verdicts = {r.seq: gate.judge(r.seq, r.subject, r.data) for r in recs}
    refused = {s for s, v in verdicts.items() if isinstance(v, Refused)}
    _owners_hold(recs, verdicts)
    auditor = Auditor(anchor=ANCHOR, first_seq=1)
    for r in recs:
        auditor.check(r.seq, r.subject, r.data)
    assert auditor.refused == {s: v.reason for s, v in verdicts.items() if isinstance(v, Refused)}
    folds = env.run(_folds(env, recs, tmp_path))

    def on(*prefixes: str) -> set[int]:
        return {r.seq for r in recs if r.seq in refused and r.subject.startswith(prefixes)}

    every = tuple(f"dstack.{k}." for k in ("vm", "host", "app", "kms", "gateway", "cvm",
                                           "keyring"))  # fmt: skip
    assert folds["vmm"] == on(*every)
    assert folds["dashboard"] == {r.seq for r in recs if r.seq in refused}
    assert folds["scheduler"] == on("dstack.vm.", "dstack.host.", "dstack.keyring.")
    assert folds["gateway"] == on("dstack.gateway.default", "dstack.cvm.", "dstack.keyring.")
    assert folds["runtime"] == on("dstack.vm.", "dstack.host.")
    assert folds["read-model"] == len(refused)
    roots = [s for s, v in verdicts.items() if isinstance(v, Allowed)
             and isinstance(v.event, KmsRootCreated)]  # fmt: skip
    assert folds["kms-root"] == bool(roots)
