"""Where the write policy meets the actors: a ``Gate`` plus its metric and its log line.

Every fold that acts holds a :class:`Judge` and folds only what it admits::

    judge = Judge("scheduler", anchor=store.anchor)
    for rec in records:                          # stream order, every subject
        ok = judge.admit(rec.seq, rec.subject, rec.data)
        if ok is not None and ok.event is not None:
            fold(ok.event)

A refused event is skipped, counted once in ``pydstack_events_refused_total{actor,reason}``
and logged once with its sequence and reason. A reader that sees only some subjects (one
aggregate, or a durable consumer's filter) calls :meth:`Judge.load_keyring` first, and
:meth:`Judge.admit_read` loads a VM's or an app's history when an owner rule needs it.
:func:`ensure_keyring` is how ``pydstack up`` (the admin) puts its identities on the log.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Final, Protocol

import structlog

from pydstack.adapters.nats import ConflictError, EventStore, StoreError
from pydstack.core.events import (
    CodecError,
    Envelope,
    Event,
    KeyringEntryAdded,
    VmRequested,
    decode_body,
    open_envelope,
    seal,
)
from pydstack.core.events import subject as subject_of
from pydstack.core.policy import (
    KEYRING_FILTER,
    KEYRING_SUBJECT,
    POLICY,
    Allowed,
    Gate,
    Policy,
    Refused,
    Verdict,
    additions,
    app_owner_key,
    vm_app_key,
)

from . import metrics

_log = structlog.get_logger("pydstack.trust")
_SEEN_MAX: Final = 100_000
# (actor, seq, event id) of the refusals reported: two folds of one actor (its consumer and its
# view) count and log an event once; the id tells apart two streams' events at one seq.
_seen: OrderedDict[tuple[str, int, str], None] = OrderedDict()


class _Rec(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def subject(self) -> str: ...
    @property
    def data(self) -> bytes: ...


def _first_time(actor: str, seq: int, ident: str) -> bool:
    key = (actor, seq, ident)
    if key in _seen:
        return False
    _seen[key] = None
    if len(_seen) > _SEEN_MAX:
        _seen.popitem(last=False)
    return True


class Judge:
    """One actor's gate: admits or refuses each stored message, counting and logging refusals."""

    def __init__(
        self,
        actor: str,
        anchor: bytes | None = None,
        *,
        verify: bool = True,
        policy: Policy = POLICY,
    ) -> None:
        self.actor = actor
        self.gate = Gate.pinned(anchor, policy=policy, verify=verify)
        self.refused: OrderedDict[int, Refused] = OrderedDict()  # recent refusals, by seq
        self._keyring_upto = 0  # every keyring event below this seq is folded

    def pin(self, anchor: bytes | None) -> None:
        """Pin the admin key of the store it reads through (before the first event)."""
        self.gate.pin(anchor)

    def admit(
        self, seq: int, subject: str, data: bytes, opened: Envelope | None = None
    ) -> Allowed | None:
        """The allowed event, or None (refused: counted and logged)."""
        v: Verdict = self.gate.judge(seq, subject, data, opened=opened)
        if isinstance(v, Refused):
            self._refuse(seq, subject, v)
            return None
        return v

    def _refuse(self, seq: int, subject: str, v: Refused) -> None:
        self.refused[seq] = v
        if len(self.refused) > 1000:
            self.refused.popitem(last=False)
        env = v.envelope
        if not _first_time(self.actor, seq, env.id if env else ""):
            return
        metrics.REFUSED.labels(self.actor, v.reason).inc()
        _log.warning(
            "event refused by the write policy; skipped",
            actor=self.actor, seq=seq, subject=subject, reason=v.reason, detail=v.detail,
            event_type=env.type if env else None, signer=env.actor if env else None,
        )  # fmt: skip

    # -- readers of some subjects only -----------------------------------------------------------

    async def load_keyring(self, store: EventStore, upto: int) -> None:
        """Fold every keyring event stored before ``upto`` (one read, only when ``upto`` is
        past what was loaded): what a reader of one aggregate or one consumer needs first."""
        if upto <= self._keyring_upto:
            return
        self.pin(store.anchor)
        records, _ = await store.read_aggregate(KEYRING_FILTER)
        self.learn(records)  # a refused keyring event is the keyring's readers' to report
        self._keyring_upto = upto

    async def admit_read(
        self, store: EventStore, seq: int, subject: str, data: bytes, opened: Envelope | None = None
    ) -> Allowed | None:
        """``admit`` for a reader that did not see the stream from its start: loads the keyring
        up to ``seq`` first, and the VM's own history when a host-bound writer's ownership of
        it is not known yet (the VM's pin and placement are on its own subject)."""
        await self.load_keyring(store, seq)
        v = self.gate.judge(seq, subject, data, opened=opened)
        if isinstance(v, Refused) and v.reason == "not-owner":
            v = await self.with_owners(store, seq, subject, data, opened, v)
        if isinstance(v, Refused):
            self._refuse(seq, subject, v)
            return None
        return v

    async def with_owners(
        self,
        store: EventStore,
        seq: int,
        subject: str,
        data: bytes,
        opened: Envelope | None,
        v: Verdict,
    ) -> Verdict:
        """``v`` (a ``not-owner`` refusal) judged again once the owners it needs are loaded
        from their own subjects: the VM's history (its pin, placement and app), then the
        app's (its owner); ``v`` itself when nothing was missing."""
        owners = self.gate.owners
        kind, _, agg = subject.removeprefix("dstack.").partition(".")
        history: list[_Rec] = []
        apps = {agg} if kind == "app" else set()
        if kind == "vm":
            if agg not in owners or vm_app_key(agg) not in owners:
                found, _ = await store.read_aggregate(subject)
                history = [r for r in found if r.seq < seq]
            apps |= {owners.get(vm_app_key(agg), "")} | {_requested_app(r.data) for r in history}
            if v.envelope is not None:
                apps.add(_requested_app(data))
        todo = sorted(a for a in apps if a and app_owner_key(a) not in owners)
        for app in todo:
            found, _ = await store.read_aggregate(subject_of("app", app))
            history += [r for r in found if r.seq < seq]
        self.learn(sorted(history, key=lambda r: r.seq))  # in stream order, as a full reader
        if not history:
            return v
        return self.gate.judge(seq, subject, data, opened=opened)

    def learn(self, records: Iterable[_Rec]) -> None:
        """Judge earlier records only for what they teach the gate (no counting, no log)."""
        for rec in records:
            self.gate.judge(rec.seq, rec.subject, rec.data)

    async def admitted(self, store: EventStore, records: Iterable[_Rec]) -> list[Allowed]:
        """The allowed events among one aggregate's records (keyring loaded first)."""
        recs = list(records)
        if recs:
            await self.load_keyring(store, recs[-1].seq)
        out = []
        for rec in recs:
            ok = self.admit(rec.seq, rec.subject, rec.data)
            if ok is not None:
                out.append(ok)
        return out


def _requested_app(data: bytes) -> str:
    """The app id a stored VmRequested names ("" for anything else)."""
    try:
        env = open_envelope(data)
        event = decode_body(env) if env.type == "VmRequested" else None
    except (CodecError, UnicodeDecodeError):
        return ""
    return event.app_id if isinstance(event, VmRequested) else ""


async def would_refuse(store: EventStore, writes: Iterable[tuple[str, Event]]) -> Refused | None:
    """What the write policy would say to ``store``'s signer appending ``writes`` now (one
    ``(subject, event)`` each): the first refusal, as every fold would judge it, or None. A
    writer asks before appending (the CLI, the dashboard), so a refused write is an error
    message, not a skipped event on the permanent log."""
    judge = Judge("writer", store.anchor)
    seq = await store.last_seq() + 1
    await judge.load_keyring(store, seq)
    for i, (subj, event) in enumerate(writes):  # at the sequences a commit would store them
        data = seal(store.signer, event, subject=subj, event_id="check", time_ns=0,
                    correlation="check")  # fmt: skip
        v = judge.gate.judge(seq + i, subj, data)
        if isinstance(v, Refused) and v.reason == "not-owner":
            v = await judge.with_owners(store, seq + i, subj, data, None, v)
        if isinstance(v, Refused):
            return v
    return None


Wanted = list[tuple[bytes, str, str, tuple[str, ...]]]  # (key, name, role, hosts)


async def ensure_keyring(admin: EventStore, wanted: Wanted) -> list[KeyringEntryAdded]:
    """Bind every wanted identity on the log's keyring, signed by ``admin`` (whose key must be
    the anchor, or an admin of the keyring); returns what it appended. The first call on a
    log without a keyring starts it: events already stored become "pre-keyring"."""
    for _ in range(10):
        records, version = await admin.read_aggregate(KEYRING_SUBJECT)
        judge = Judge("keyring", admin.anchor)
        judge.learn(records)
        ring = judge.gate.keyring
        new = additions(ring, wanted)
        if not new:
            return []
        if ring.genesis and not ring.is_admin(admin.signer.public_key, version.seq + 1):
            _log.warning("cannot bind identities on the log's keyring: this admin key is not "
                         "its admin", key=admin.signer.public_key.hex()[:16])  # fmt: skip
            return []
        try:
            await admin.append(KEYRING_SUBJECT, new, version)
        except ConflictError:
            continue  # another admin wrote meanwhile: decide again on what is there now
        _log.info("keyring updated", entries=[f"{e.name} ({e.role})" for e in new])
        return new
    raise StoreError(f"{KEYRING_SUBJECT} kept changing; try again")
