"""What the dashboard shows, folded from the log in memory: no I/O here.

``LiveState.apply(records)`` takes stored messages in stream order and updates every view at
once: apps, VMs and hosts (the shared projections), KMS decisions with their BootInfo,
gateway clusters (the gateway fold) and a bounded window of recent events. It returns one
``EventRow`` per message plus the names of the views that changed, which is what the
server pushes to browsers. Only what the write policy allows is folded (``judge``); a refused
event still gets its row, with the refusal as its ``error``. Usage::

    state = LiveState()
    rows, changed = state.apply(records)   # records: .seq, .subject, .data, .time_ns
    state.proj.vms["vm-1"].state           # "scheduled"
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import msgspec

from pydstack.actors.decode import Malformed, decode_message
from pydstack.actors.trust import Judge
from pydstack.core.events import (
    AnyEvent,
    BootInfo,
    CvmRegistered,
    Envelope,
    KeyDenied,
    KeyIssued,
    KeyRequested,
    KmsRootCreated,
)
from pydstack.core.gateway.certs import CertState, is_cert_subject
from pydstack.core.gateway.certs import fold as fold_certs
from pydstack.core.gateway.certs import on_its_subject as on_its_cert_subject
from pydstack.core.gateway.cluster import DEFAULT_CLUSTER, ClusterState, on_its_subject
from pydstack.core.gateway.cluster import fold as fold_cluster
from pydstack.core.kms import KmsState
from pydstack.core.kms import apply as apply_kms
from pydstack.core.policy import STRUCTURAL
from pydstack.core.projections import Applied, Projections, apps, hosts, route, vms

EVENT_WINDOW: Final = 5000  # recent events kept for the live page and /api/events
DECISION_WINDOW: Final = 2000  # KMS decisions kept (newest win)
VIEWS: Final = ("hosts", "apps", "vms", "keys", "gateways", "events")


class Record(Protocol):
    """A stored message as the event store yields it (``Recorded``)."""

    @property
    def seq(self) -> int: ...
    @property
    def subject(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    @property
    def time_ns(self) -> int: ...


@dataclass(frozen=True, slots=True)
class EventRow:
    """One message for the event stream page: metadata, the body as JSON, or why it is bad."""

    seq: int
    time_ns: int
    subject: str
    type: str
    actor: str = ""
    id: str = ""
    correlation: str = ""
    causation: str = ""
    body: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # set when the message is not a valid, signed pydstack event

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "time_ns": self.time_ns, "subject": self.subject, "type": self.type,
            "actor": self.actor, "id": self.id, "correlation": self.correlation,
            "causation": self.causation, "body": self.body, "error": self.error,
        }  # fmt: skip


@dataclass(slots=True)
class KeyDecision:
    """One KMS key request and its outcome (``pending`` until KeyIssued/KeyDenied arrives)."""

    request_id: str
    cluster: str
    method: str = ""
    app_id: str = ""
    instance_id: str = ""
    quote_hash: str = ""
    requested_seq: int = 0
    requested_ns: int = 0
    outcome: str = "pending"  # issued | denied | pending
    reason: str = ""  # denial reason, or the backend's verdict when issued
    backend: str = ""
    boot_info: BootInfo | None = None
    decided_seq: int = 0
    decided_ns: int = 0


def jsonable(value: Any, max_bytes: int = 256) -> Any:
    """Builtins for JSON: bytes as hex (long ones cut to ``max_bytes`` with their length)."""
    if isinstance(value, bytes):
        if len(value) > max_bytes:
            return f"{value[:max_bytes].hex()}… ({len(value)} bytes)"
        return value.hex()
    if isinstance(value, dict):
        return {str(k): jsonable(v, max_bytes) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v, max_bytes) for v in value]
    return value


def body_json(event: AnyEvent) -> dict[str, Any]:
    out: dict[str, Any] = jsonable(msgspec.to_builtins(event, builtin_types=(bytes,)))
    return out


class LiveState:
    """Every view of the dashboard at stream sequence ``seq``; changed only by :meth:`apply`."""

    def __init__(self, window: int = EVENT_WINDOW) -> None:
        self.proj = Projections()
        self.kms: dict[str, KmsState] = {}
        self.decisions: OrderedDict[str, KeyDecision] = OrderedDict()
        self.clusters: dict[str, ClusterState] = {}
        self.certs: dict[str, CertState] = {}  # per cluster: its domains (base domains too)
        self.events: deque[EventRow] = deque(maxlen=window)
        self.seq = 0
        self.malformed = 0  # messages not folded: malformed or refused by the write policy
        self.judge = Judge("dashboard")

    @property
    def oldest_seq(self) -> int:
        """The lowest sequence still in the event window (0 when empty)."""
        return self.events[0].seq if self.events else 0

    def apply(self, records: Iterable[Record]) -> tuple[list[EventRow], set[str]]:
        """Fold messages (ascending seq; at or below ``seq`` are skipped)."""
        rows: list[EventRow] = []
        changed: set[str] = set()
        gateway: dict[str, list[Applied]] = {}
        certs: dict[str, list[Applied]] = {}
        for rec in records:
            if rec.seq <= self.seq:
                continue
            self.seq = rec.seq
            row, a = self._admit(rec)
            if a is None:
                self.malformed += 1
            else:
                changed |= self._fold(rec.subject, a, gateway, certs)
            self.events.append(row)
            rows.append(row)
            changed.add("events")
        for name, batch in gateway.items():
            start = self.clusters.get(name) or ClusterState(cluster=name)
            self.clusters[name] = fold_cluster(batch, start)
        for name, batch in certs.items():
            self.certs[name] = fold_certs(batch, self.certs.get(name) or CertState(cluster=name))
        return rows, changed

    def _admit(self, rec: Record) -> tuple[EventRow, Applied | None]:
        ok = self.judge.admit(rec.seq, rec.subject, rec.data)
        why = None if ok is not None else self.judge.refused.get(rec.seq)
        if ok is None and why is not None and why.envelope and why.reason not in STRUCTURAL:
            env = why.envelope  # well-formed, but its writer may not write it
            return EventRow(rec.seq, rec.time_ns or env.time_ns, rec.subject, env.type,
                            actor=env.actor, id=env.id,
                            error=f"refused: {why.reason}: {why.detail}"), None  # fmt: skip
        if ok is None or ok.event is None:  # malformed (the decoder says how), or unknown type
            return _decode(rec)[0], None
        return _row(rec, ok.envelope, ok.event)

    def domains(self, cluster: str) -> list[str]:
        """The base domains added to ``cluster`` and not removed (as every node folds them)."""
        cs = self.certs.get(cluster)
        return [] if cs is None else [d.domain for d in cs.domains.values() if d.active]

    def _fold(
        self,
        subj: str,
        a: Applied,
        gateway: dict[str, list[Applied]],
        certs: dict[str, list[Applied]],
    ) -> set[str]:
        e = a.event
        target = route(e)
        if target is not None:
            model, key = target
            p = self.proj
            p.seq = a.seq
            if model == "vms":
                vm = vms.apply(p.vms.get(key), a)
                if vm is not None:
                    p.vms[key] = vm
            elif model == "hosts":
                host = hosts.apply(p.hosts.get(key), a)
                if host is not None:
                    p.hosts[key] = host
            else:
                app = apps.apply(p.apps.get(key), a)
                if app is not None:
                    p.apps[key] = app
            # A VM placed or released changes its host's usage row and its app's VM count.
            return {model, "hosts"} if model == "vms" else {model, "vms"}
        kind = subj.split(".")[1] if subj.count(".") == 2 else ""
        if kind == "kms":
            self._kms(subj.split(".")[2], a)
            return {"keys"}
        if kind == "gateway" and ":" in subj:  # a cluster's domain or ACME account aggregate
            name = subj.split(".")[2].split(":", 1)[0]
            if is_cert_subject(name, subj) and on_its_cert_subject(name, subj, e):
                certs.setdefault(name, []).append(a)
            return {"gateways"}
        if kind in ("gateway", "cvm"):
            for name in self._clusters_for(subj, e):
                if on_its_subject(name, subj, e):
                    gateway.setdefault(name, []).append(a)
            return {"gateways"}
        return set()

    def _clusters_for(self, subj: str, e: AnyEvent) -> list[str]:
        if subj.startswith("dstack.gateway."):
            return [subj.split(".")[2]]
        if isinstance(e, CvmRegistered):
            return [e.cluster or DEFAULT_CLUSTER]
        # Liveness / recycle / removal name no cluster: each cluster's fold knows its own.
        return list(self.clusters) or [DEFAULT_CLUSTER]

    def _kms(self, cluster: str, a: Applied) -> None:
        e = a.event
        self.kms[cluster] = apply_kms(self.kms.get(cluster) or KmsState(), e)
        match e:
            case KeyRequested():
                d = self._decision(e.request_id, cluster)
                d.method, d.app_id, d.instance_id = e.method, e.app_id, e.instance_id
                d.quote_hash, d.requested_seq, d.requested_ns = e.quote_hash, a.seq, a.time_ns
            case KeyIssued() | KeyDenied():
                d = self._decision(e.request_id, cluster)
                d.outcome = "issued" if isinstance(e, KeyIssued) else "denied"
                d.reason = e.verdict if isinstance(e, KeyIssued) else e.reason
                d.backend = e.backend if isinstance(e, KeyIssued) else ""
                d.boot_info = e.boot_info
                d.quote_hash = d.quote_hash or e.quote_hash
                if e.boot_info is not None:
                    d.app_id = d.app_id or e.boot_info.app_id
                    d.instance_id = d.instance_id or e.boot_info.instance_id
                d.decided_seq, d.decided_ns = a.seq, a.time_ns
            case _:
                pass

    def _decision(self, request_id: str, cluster: str) -> KeyDecision:
        d = self.decisions.get(request_id)
        if d is None:
            d = self.decisions[request_id] = KeyDecision(request_id, cluster)
            while len(self.decisions) > DECISION_WINDOW:
                self.decisions.popitem(last=False)
        return d

    def kms_root(self, cluster: str) -> KmsRootCreated | None:
        """The root of KMS cluster `cluster` on the log, as its KMS folds it; another
        cluster's root never stands in for it."""
        state = self.kms.get(cluster)
        return state.root if state is not None else None


def row_of(rec: Record) -> EventRow:
    """The event row of one stored message; ``error`` says why it is not a valid event."""
    return _decode(rec)[0]


def _decode(rec: Record) -> tuple[EventRow, Applied | None]:
    try:
        env, event = decode_message(rec.subject, rec.data)
    except Malformed as bad:
        return EventRow(rec.seq, rec.time_ns, rec.subject, "?", error=str(bad)), None
    return _row(rec, env, event)


def _row(rec: Record, env: Envelope, event: AnyEvent) -> tuple[EventRow, Applied]:
    row = EventRow(
        seq=rec.seq,
        time_ns=rec.time_ns or env.time_ns,
        subject=rec.subject,
        type=env.type,
        actor=env.actor,
        id=env.id,
        correlation=env.correlation,
        causation=env.causation,
        body=body_json(event),
    )
    return row, Applied(rec.seq, row.time_ns, event, env.id)
