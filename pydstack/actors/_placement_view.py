"""The scheduler's in-memory view of the log: hosts, undecided VMs, and aggregate versions.

The view is a fold of every message up to ``cursor`` (a consistent snapshot across
aggregates), kept current by reading the stream from the cursor. Besides the host and VM
folds it records each relevant subject's :class:`Version` (sequence and hash of its last
message, valid or not), which is what an optimistic append must name. Host and VM messages go
through the write policy (``judge``; keyring messages teach it): what it refuses is skipped.

:meth:`PlacementView.rows` and :meth:`PlacementView.restored` turn the view into keyed rows and
back (the scheduler's checkpoint, ``pydstack.adapters.sqlite.CheckpointFile``): hosts, host
heads, undecided VMs, decided VM ids, the gate's keyring and owners, and the configuration the
fold depends on. A restored view folds on from its cursor exactly as the original would have.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import msgspec
import structlog
from msgspec.structs import replace

from pydstack.adapters.nats import Recorded, Version
from pydstack.core.events import HostJoined, message_hash, parse_subject
from pydstack.core.events import subject as subject_of
from pydstack.core.policy import Keyring
from pydstack.core.projections import Applied, Host, Vm, hosts, vms

from .trust import Judge

_log = structlog.get_logger("pydstack.scheduler")


@dataclass(frozen=True, slots=True)
class HostDefaults:
    """Capacity assumed for what a ``HostJoined`` leaves out (dstack's defaults)."""

    vcpu: int = 20
    memory_mb: int = 100 * 1024
    cid_start: int = 1000
    cid_count: int = 1000
    port_range: tuple[int, int] = (20000, 29999)


_DEFAULTABLE: Final = ("vcpu", "memory_mb", "cid_start", "cid_count", "port_range")
# Bump when a row's encoding or the fold's meaning changes: older checkpoints then rebuild.
SCHEMA: Final = 1
Rows = dict[str, dict[str, bytes]]
_enc: Final = msgspec.msgpack.Encoder().encode
_host_dec: Final = msgspec.msgpack.Decoder(Host).decode
_head_dec: Final = msgspec.msgpack.Decoder(tuple[int, bytes]).decode
_keyring_dec: Final = msgspec.msgpack.Decoder(Keyring).decode


class _PendingRow(msgspec.Struct, array_like=True, frozen=True):
    vm: Vm
    seq: int
    hash: bytes
    request_id: str
    correlation: str


_pending_dec: Final = msgspec.msgpack.Decoder(_PendingRow).decode


@dataclass(slots=True)
class Pending:
    """A requested VM nobody has decided on yet."""

    vm: Vm
    version: Version
    request_id: str  # envelope id of the VmRequested (causation of the decision)
    correlation: str


@dataclass(slots=True)
class PlacementView:
    defaults: HostDefaults = field(default_factory=HostDefaults)
    check_signatures: bool = True
    cursor: int = 0
    hosts: dict[str, Host] = field(default_factory=dict)
    host_versions: dict[str, Version] = field(default_factory=dict)
    pending: dict[str, Pending] = field(default_factory=dict)
    decided: set[str] = field(default_factory=set)
    skipped: int = 0  # messages passed over while folding (malformed or refused)
    judge: Judge = field(default_factory=lambda: Judge("scheduler"))
    folded: int = 0  # messages read past the cursor (what a resumed view did not re-read)
    head: Recorded | None = None  # the message at the cursor (its hash goes in a checkpoint)

    def __post_init__(self) -> None:
        self.judge.gate.verify = self.check_signatures

    def fold(self, records: Iterable[Recorded]) -> None:
        """Fold stored messages in stream order; messages at or below the cursor are skipped."""
        for rec in records:
            if rec.seq <= self.cursor:
                continue
            self.cursor = rec.seq
            self.head = rec
            self.folded += 1
            try:
                kind, agg_id = parse_subject(rec.subject)
            except ValueError:
                continue
            if kind == "host":
                self._fold_host(agg_id, rec)
            elif kind == "vm":
                self._fold_vm(agg_id, rec)
            elif kind == "keyring":
                self.judge.admit(rec.seq, rec.subject, rec.data)
            elif kind == "app":  # app owners: a tenant may request VMs of its own apps only
                self.judge.learn((rec,))

    def _decode(self, rec: Recorded) -> tuple[Applied, str] | None:
        """The event as the folds take it, and its correlation id; None if malformed."""
        ok = self.judge.admit(rec.seq, rec.subject, rec.data)
        if ok is None or ok.event is None:
            self.skipped += 1
            return None
        env, event = ok.envelope, ok.event
        if isinstance(event, HostJoined):
            event = self._with_defaults(event, env.body)
        return Applied(rec.seq, rec.time_ns or env.time_ns, event, env.id), env.correlation

    def _with_defaults(self, event: HostJoined, body: bytes) -> HostJoined:
        # The event's own defaults are dstack's; a field the host did not send takes ours.
        # Bodies are encoded with omit_defaults, so a host that states exactly dstack's
        # default value looks the same as one that is silent, and gets ours too.
        present = msgspec.msgpack.decode(body)
        missing = {k: getattr(self.defaults, k) for k in _DEFAULTABLE if k not in present}
        return replace(event, **missing) if missing else event

    def _fold_host(self, host_id: str, rec: Recorded) -> None:
        subject = rec.subject
        self.host_versions[subject] = Version(rec.seq, message_hash(rec.data))
        got = self._decode(rec)
        if got is None or getattr(got[0].event, "host_id", host_id) != host_id:
            return
        a = got[0]
        host = hosts.apply(self.hosts.get(host_id), a)
        if host is not None:
            self.hosts[host_id] = host

    def _fold_vm(self, vm_id: str, rec: Recorded) -> None:
        if vm_id in self.decided:  # nothing to decide; judged still: refusals are counted
            self.judge.admit(rec.seq, rec.subject, rec.data)  # (and owners learnt) by all folds
            return
        version = Version(rec.seq, message_hash(rec.data))
        got = self._decode(rec)
        pending = self.pending.get(vm_id)
        if got is None or getattr(got[0].event, "vm_id", vm_id) != vm_id:
            if pending is not None:
                pending.version = version
            return
        a, correlation = got
        vm = vms.apply(pending.vm if pending else None, a)
        if vm is None:  # an event for a VM never requested: nothing to decide
            return
        if vm.state != "requested":
            self.pending.pop(vm_id, None)
            self.decided.add(vm_id)
        elif pending is None:
            self.pending[vm_id] = Pending(vm, version, a.id, correlation)
        else:
            pending.vm = vm
            pending.version = version

    def mark_decided(self, vm_id: str) -> None:
        self.pending.pop(vm_id, None)
        self.decided.add(vm_id)

    def place(self, host_subject: str, applied: Applied, version: Version) -> None:
        """Record our own committed reservation before the stream read catches up with it."""
        host_id = parse_subject(host_subject)[1]
        host = hosts.apply(self.hosts.get(host_id), applied)
        if host is not None:
            self.hosts[host_id] = host
        self.host_versions[host_subject] = version

    # -- checkpoint rows --------------------------------------------------------------------

    def config_row(self) -> bytes:
        """What the fold depends on besides the log: a checkpoint folded under other host
        defaults, or without signature checks, is not this view's."""
        d = self.defaults
        fields = (d.vcpu, d.memory_mb, d.cid_start, d.cid_count, d.port_range)
        return _enc((*fields, self.check_signatures))

    def rows(self) -> Rows:
        """The view as keyed rows (see the module doc); the cursor goes beside them."""
        gate = self.judge.gate
        pending = {
            vm: _enc(_PendingRow(p.vm, p.version.seq, p.version.hash, p.request_id, p.correlation))
            for vm, p in self.pending.items()
        }
        return {
            "config": {"": self.config_row()},
            "host": {h: _enc(s) for h, s in self.hosts.items()},
            "head": {subj: _enc((v.seq, v.hash)) for subj, v in self.host_versions.items()},
            "pending": pending,
            "decided": dict.fromkeys(self.decided, b""),
            "owner": {k: v.encode() for k, v in gate.owners.items()},
            "keyring": {"": _enc(gate.keyring)},
        }

    def heads(self) -> dict[str, Version]:
        """Each aggregate's version the view holds: what must still be on the log."""
        out = dict(self.host_versions)
        out.update((subject_of("vm", vm), p.version) for vm, p in self.pending.items())
        return out

    @classmethod
    def restored(
        cls, cursor: int, rows: Rows, defaults: HostDefaults, check_signatures: bool,
        judge: Judge, anchor: bytes | None,
    ) -> PlacementView:  # fmt: skip
        """The view a checkpoint holds; ValueError if its rows do not make one (a decode
        error, another configuration, a keyring rooted in another admin key)."""
        view = cls(defaults, check_signatures, cursor=cursor, judge=judge)
        if rows.get("config", {}).get("") != view.config_row():
            raise ValueError("folded under another configuration")
        try:
            view.hosts = {h: _host_dec(b) for h, b in rows.get("host", {}).items()}
            for subj, b in rows.get("head", {}).items():
                seq, digest = _head_dec(b)
                view.host_versions[subj] = Version(seq, digest)
            for vm, b in rows.get("pending", {}).items():
                p = _pending_dec(b)
                view.pending[vm] = Pending(p.vm, Version(p.seq, p.hash), p.request_id,
                                           p.correlation)  # fmt: skip
            view.decided = set(rows.get("decided", {}))
            owners = {k: v.decode() for k, v in rows.get("owner", {}).items()}
            keyring = _keyring_dec(rows["keyring"][""])
        except (msgspec.DecodeError, KeyError, UnicodeDecodeError) as exc:
            raise ValueError(f"rows do not decode: {exc}") from None
        if any(h.host_id != hid for hid, h in view.hosts.items()):
            raise ValueError("a host row names another host")
        judge.gate.keyring = keyring
        judge.gate.owners = owners
        judge.pin(anchor)  # ValueError if the keyring is rooted in another admin key
        return view
