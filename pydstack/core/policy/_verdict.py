"""The verdict on one stored message: may a fold take it? One pure function for every reader.

Every fold that acts (scheduler, VMM, KMS, gateway, dashboard, read models) and the auditor ask
the same question with the same code, so they skip exactly the same events::

    v = verdict(keyring, POLICY, subject, data, seq, owners)
    if isinstance(v, Refused):
        count(v.reason)              # a stable code, fit for a metric label
    else:
        fold(v.event)                # None: a type this version does not know

or, for a reader that sees the stream in order, a :class:`Gate` that also folds the keyring
and the VM owners as it goes (``gate.judge(seq, subject, data)``).

The checks, in order: the bytes are an envelope stored on the subject it names; its Ed25519
signature verifies against the key it carries; the body matches its type; then, once the log
has a keyring (see ``_keyring``), the key is bound at that sequence and not revoked, its role
may write this type on this kind of aggregate, the body's id is the subject's, a host-bound
writer (a VMM) stays on its own hosts and their VMs, and the app owner rule holds: the key
that signed an app's first ``AppRegistered`` owns it, and only that key or an admin writes
the app's events afterwards (the host's ``operator`` included: it owns only the apps it
registered); an app-bound writer (a tenant) requests and commands only VMs of its own apps.

``owners`` holds what the owner rules need, folded from the aggregates' own subjects by a
:class:`Gate`: ``<vm_id>`` -> the VM's host (placement or pin), ``app.<app_id>`` -> the
owner's public key (hex) ``@`` the sequence of its registration (a timeline: an event before
it sees no owner, whatever order a partial reader learnt them in), ``vmapp.<vm_id>`` -> the
app id the VM was requested under (VM and app ids are subject tokens: they hold no dot, so
the three never collide).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import msgspec
from nacl.bindings import crypto_sign_open as _sodium_open
from nacl.exceptions import BadSignatureError

from pydstack.core.events import (
    AnyEvent,
    AppRegistered,
    CodecError,
    Envelope,
    KeyRevoked,
    KeyringEntryAdded,
    VmRequested,
    VmScheduled,
    decode_body,
    open_envelope,
)
from pydstack.core.events.envelope import SIG_LEN
from pydstack.core.events.subjects import KINDS, PREFIX

from ._keyring import Binding, Keyring, entry_error
from ._keyring import apply as apply_keyring
from ._table import ADMIN, AGGREGATE_FIELDS, HOST_FIELDS, POLICY, Policy

# Stable refusal codes (metric labels, audit finding codes).
REASONS: Final = (
    "unparseable", "subject-mismatch", "bad-signature", "type-mismatch", "bad-body",
    "unknown-signer", "revoked-signer", "not-allowed", "bad-keyring-entry",
    "aggregate-mismatch", "not-owner",
)  # fmt: skip
# The ones about the bytes themselves, not about who wrote them (the auditor has its own
# findings for these; folds skip them all the same).
STRUCTURAL: Final = frozenset(REASONS[:5])


@dataclass(frozen=True, slots=True)
class Allowed:
    """The message may be folded: its envelope, its body (None: a type unknown here), who
    signed it (None before the keyring) and whether it predates the keyring."""

    envelope: Envelope
    event: AnyEvent | None
    signer: Binding | None = None
    pre_keyring: bool = False


@dataclass(frozen=True, slots=True)
class Refused:
    """The message must not be folded: a stable ``reason`` code and a one-line ``detail``."""

    reason: str
    detail: str
    envelope: Envelope | None = None


Verdict = Allowed | Refused


class _Tag(msgspec.Struct):
    type: str = ""


_tag: Final = msgspec.msgpack.Decoder(_Tag)
_NO_OWNERS: Final[Mapping[str, str]] = {}
_KEYRING_PREFIX: Final = f"{PREFIX}.keyring."


def _split(subject: str) -> tuple[str, str]:
    """``(kind, id)`` of an aggregate subject, ``("", "")`` for anything else (fast path)."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[0] != PREFIX or parts[1] not in KINDS or not parts[2]:
        return "", ""
    return parts[1], parts[2]


def _who(b: Binding) -> str:
    return f"{b.name!r} ({b.role})"


def verdict(
    keyring: Keyring,
    policy: Policy,
    subject: str,
    data: bytes,
    seq: int,
    owners: Mapping[str, str] = _NO_OWNERS,
    *,
    verify: bool = True,
    opened: Envelope | None = None,
) -> Verdict:
    """May the message ``data`` stored on ``subject`` at ``seq`` be folded?

    ``owners``: VM id -> the host it is placed on (or pinned to; "" while neither), from the
    events before ``seq`` (a :class:`Gate` keeps it). ``opened``: the envelope, already
    decoded and its signature verified by the caller (the auditor); ``verify=False`` skips the
    signature (benchmarks of the folds alone).
    """
    if opened is None:
        try:
            env = open_envelope(data)
        except (CodecError, UnicodeDecodeError) as exc:
            return Refused("unparseable", str(exc))
        if verify:
            if len(env.key) != 32:
                return Refused("bad-signature", f"a {len(env.key)}-byte key", env)
            try:
                # libsodium: twice as fast as OpenSSL here, the same RFC 8032 check
                _sodium_open(data[-SIG_LEN:] + data[:-SIG_LEN], env.key)
            except BadSignatureError:
                return Refused("bad-signature", f"does not verify with {env.key.hex()[:16]}…", env)
    else:
        env = opened
    if env.subject != subject:
        return Refused("subject-mismatch", f"names {env.subject}, stored on {subject}", env)
    try:
        tag = _tag.decode(env.body).type
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return Refused("bad-body", f"body is not an event: {exc}", env)
    if tag != env.type:
        return Refused("type-mismatch", f"body is a {tag!r}, envelope says {env.type!r}", env)
    try:
        event = decode_body(env)
    except CodecError as exc:
        return Refused("bad-body", str(exc), env)
    kind, agg = _split(subject)
    if kind == "keyring":
        return _keyring_verdict(keyring, policy, env, event, seq)
    if keyring.pre_keyring(seq):
        return Allowed(env, event, None, pre_keyring=True)
    b = keyring.binding(env.key, seq)
    if b is None and env.key == keyring.anchor:
        b = Binding(keyring.genesis, ADMIN, ADMIN)
    if b is None:
        return Refused("unknown-signer", f"key {env.key.hex()[:16]}… is not in the keyring", env)
    if b.revoked:
        return Refused("revoked-signer", f"{_who(b)} was revoked at seq {b.since}", env)
    if event is None:  # a newer writer's type: nothing here folds it (the auditor warns)
        return Allowed(env, None, b)
    if not kind:
        return Refused("not-allowed", f"{subject} is not an aggregate subject", env)
    if not policy.may_write(b.role, env.type, kind):
        return Refused("not-allowed", f"{_who(b)} may not write {env.type} on {kind}", env)
    id_field = AGGREGATE_FIELDS.get(kind)
    if id_field is not None and getattr(event, id_field, agg) != agg:
        named = getattr(event, id_field)
        return Refused("aggregate-mismatch", f"{id_field} {named!r} stored on {subject}", env)
    if b.role in policy.host_bound:
        bad = _owner_error(b, kind, agg, event, owners)
        if bad is not None:
            return Refused("not-owner", f"{_who(b)} {bad}", env)
    if b.role not in policy.app_admins and (
        kind == "app" or (kind == "vm" and b.role in policy.app_bound)
    ):
        bad = _app_owner_error(env.key, kind, agg, event, owners, seq)
        if bad is not None:
            return Refused("not-owner", f"{_who(b)} {bad}", env)
    return Allowed(env, event, b)


def app_owner_key(app_id: str) -> str:
    """The ``owners`` entry holding an app's owner (its public key, hex)."""
    return f"app.{app_id}"


def vm_app_key(vm_id: str) -> str:
    """The ``owners`` entry holding the app id a VM was requested under."""
    return f"vmapp.{vm_id}"


def _app_owner(owners: Mapping[str, str], app_id: str, seq: int) -> str | None:
    """The app's owner key (hex) as of ``seq``: registered before it (None: not then)."""
    owner, _, since = owners.get(app_owner_key(app_id), "").partition("@")
    if not owner or (since.isdigit() and int(since) >= seq):
        return None
    return owner


def _app_owner_error(
    key: bytes, kind: str, agg: str, event: AnyEvent, owners: Mapping[str, str], seq: int
) -> str | None:
    """Why a writer that is not an app admin may not write this (None: it may). On an app's
    subject: only its owner, once registered (the first AppRegistered makes its signer the
    owner). On a VM's subject (app-bound writers only): the VM's app must be the writer's."""
    me = key.hex()
    if kind == "app":
        owner = _app_owner(owners, agg, seq)
        if owner is None:
            return None if isinstance(event, AppRegistered) else f"may not write app {agg}: " \
                "never registered"  # fmt: skip
        return None if owner == me else f"may not write app {agg}: owned by {owner[:16]}…"
    if isinstance(event, VmRequested):
        app = event.app_id
    else:
        app = owners.get(vm_app_key(agg), "")
        if not app:
            return f"may not write vm {agg}: never requested under an app"
    owner = _app_owner(owners, app, seq)
    if owner is None:
        return f"may not write vm {agg}: app {app} is not registered"
    return None if owner == me else f"may not write vm {agg}: app {app} is not its own"


def _keyring_verdict(
    keyring: Keyring, policy: Policy, env: Envelope, event: AnyEvent | None, seq: int
) -> Verdict:
    if not isinstance(event, KeyringEntryAdded | KeyRevoked):
        return Refused("not-allowed", f"{env.type} is not a keyring event", env)
    err = entry_error(keyring, policy, env.key, event, seq)
    if err is not None:
        return Refused(err[0], err[1], env)
    return Allowed(env, event, keyring.binding(env.key, seq))


def _owner_error(
    b: Binding, kind: str, agg: str, event: AnyEvent, owners: Mapping[str, str]
) -> str | None:
    """Why a host-bound writer may not write this (None: it may)."""
    hosts = b.hosts
    for f in HOST_FIELDS:
        named = getattr(event, f, "")
        if named and named not in hosts:
            return f"names host {named!r}; it acts for {list(hosts)}"
    if kind == "host":
        return None if agg in hosts else f"may not write host {agg}; it acts for {list(hosts)}"
    if kind != "vm":
        return f"writes no {kind} aggregate"
    owner = owners.get(agg)
    if isinstance(event, VmRequested):  # creating a VM: pinned to one of its own hosts
        if not event.host:
            return "may only request VMs pinned to its own host"
        if owner is not None and owner not in hosts:
            return f"may not request vm {agg}: it exists already"
        return None
    if owner is None:
        return f"may not write vm {agg}: never requested"
    if owner not in hosts:
        where = f"placed on {owner!r}" if owner else "not placed yet"
        return f"may not write vm {agg}: {where}, it acts for {list(hosts)}"
    return None


@dataclass
class Gate:
    """Judges stored messages in stream order and folds what the verdicts depend on: the
    keyring (its own subject), each VM's owner (its VmRequested pin, then VmScheduled) and
    app (its VmRequested), and each app's owner (the signer of its first AppRegistered).

    A reader that sees only some subjects feeds the keyring subject first (``judge`` ignores
    a keyring event it already folded), the history of a VM before that VM's events, and the
    history of an app before a tenant's events on its VMs.
    Pure: no clock, no I/O; the caller counts and logs the refusals.
    """

    policy: Policy = POLICY
    verify: bool = True
    keyring: Keyring = field(default_factory=Keyring)
    owners: dict[str, str] = field(default_factory=dict)
    _owner_changes: dict[str, str] = field(default_factory=dict, repr=False)
    _keyring_verdicts: dict[int, Verdict] = field(default_factory=dict, repr=False)

    @classmethod
    def pinned(cls, anchor: bytes | None, *, policy: Policy = POLICY, verify: bool = True) -> Gate:
        return cls(policy, verify, Keyring.pinned_to(anchor))

    def pin(self, anchor: bytes | None) -> None:
        """Pin the admin key (before the keyring's first entry was folded)."""
        if not anchor or (self.keyring.pinned and self.keyring.anchor == anchor):
            return
        if self.keyring.genesis:
            if self.keyring.anchor != anchor:
                raise ValueError("the log's keyring is anchored to another admin key")
            return
        self.keyring = msgspec.structs.replace(self.keyring, anchor=anchor, pinned=True)

    def judge(
        self, seq: int, subject: str, data: bytes, *, opened: Envelope | None = None
    ) -> Verdict:
        """The verdict on one message; an allowed keyring or VM event updates the gate."""
        keyring_event = subject.startswith(_KEYRING_PREFIX)
        if keyring_event and seq in self._keyring_verdicts:  # loaded ahead, judged then
            return self._keyring_verdicts[seq]
        v = verdict(
            self.keyring, self.policy, subject, data, seq, self.owners,
            verify=self.verify, opened=opened,
        )  # fmt: skip
        if keyring_event:
            self._keyring_verdicts[seq] = v
        if isinstance(v, Allowed) and v.event is not None:
            self._learn(seq, subject, v.envelope, v.event)
        return v

    def _learn(self, seq: int, subject: str, env: Envelope, event: AnyEvent) -> None:
        kind, agg = _split(subject)
        if kind == "keyring":
            self.keyring = apply_keyring(self.keyring, seq, env.key, event)
        elif kind == "app":
            owner = app_owner_key(agg)
            if isinstance(event, AppRegistered) and owner not in self.owners:
                self.owners[owner] = self._owner_changes[owner] = f"{env.key.hex()}@{seq}"
        elif kind == "vm":
            if isinstance(event, VmRequested):
                app = vm_app_key(agg)
                if app not in self.owners:
                    self.owners[app] = self._owner_changes[app] = event.app_id
                if agg not in self.owners:
                    self.owners[agg] = self._owner_changes[agg] = event.host
            elif isinstance(event, VmScheduled) and agg in self.owners:
                self.owners[agg] = self._owner_changes[agg] = event.host

    def take_owner_changes(self) -> dict[str, str]:
        """The owners set since the last call (what a persisted read model must store)."""
        out, self._owner_changes = self._owner_changes, {}
        return out
