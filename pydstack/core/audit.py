"""Audit of the log: re-check every message's envelope, signature, hash chain and sequence.

Pure: it takes records ``(seq, subject, data)`` in stream order and yields findings; reading the
stream is the caller's job. Usage::

    auditor = Auditor(anchor=admin_key, first_seq=1)
    for seq, subject, data in records:
        for finding in auditor.check(seq, subject, data):
            print(finding.reason)
    findings_at_end = auditor.finish(last_seq=stream_last_seq)
    print(auditor.summary())

Each finding is one line naming the stream sequence it is about. What is checked:

- the sequence is contiguous from ``first_seq`` to ``last_seq`` (a deleted message leaves a gap),
  and never goes backwards (reordering or duplicate delivery);
- the bytes are a pydstack envelope and its Ed25519 signature verifies;
- the envelope names the subject the message is stored under;
- ``prev`` is the sha256 of the previous message on the same subject (the chain);
- the write policy (``pydstack.core.policy``), against the keyring on the log itself
  (``dstack.keyring.*``, rooted in ``anchor``, the admin key the auditor pins): the signer is
  bound at that sequence and not revoked, its role may write this type on this aggregate kind,
  a host's VMM stays on its own host and VMs. It is the verdict every fold applies, so a
  refused event is named here by its sequence (``refused`` maps each to its reason) and was
  skipped by every actor. Events before the keyring's first entry are "pre-keyring": checked
  for signature and chain only, and reported once as a warning;
- with a keyring file (``keyring``, the older per-signer subject lists): pre-keyring events
  are checked against it: the key is known, belongs to the actor the envelope names, and that
  actor may write this subject;
- the body's tag equals the envelope type, and a known type's body matches its schema; an
  unknown type is a warning (a newer writer), not a failure.

A message that fails is still the chain's new head: the store's writers link to whatever is
stored, so one tampered message yields findings at that message (and at most at the next one
on its subject), not on every event after it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec

from pydstack.core.events import (
    Envelope,
    SignatureError,
    decode_body,
    open_envelope,
    verify,
)
from pydstack.core.events.envelope import HASH_LEN
from pydstack.core.policy import POLICY, STRUCTURAL, Allowed, Gate, Policy, Refused

Severity = Literal["error", "warning"]


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    """One problem: the stream sequence it is about, a stable code and a one-line reason."""

    seq: int
    code: str
    reason: str
    severity: Severity = "error"
    subject: str = ""
    last_seq: int = 0  # for a gap: the last missing sequence (``seq`` is the first)


@dataclass(frozen=True, slots=True)
class Signatory:
    """A keyring entry: an actor, its Ed25519 public key and the subjects it may write."""

    actor: str
    key: bytes
    subjects: tuple[str, ...]


Keyring = Mapping[bytes, Signatory]


def make_keyring(entries: Iterable[Signatory]) -> dict[bytes, Signatory]:
    return {e.key: e for e in entries}


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: ``*`` is one token, a final ``>`` is one or more tokens."""
    pt, st = pattern.split("."), subject.split(".")
    for i, p in enumerate(pt):
        if p == ">":
            return i == len(pt) - 1 and len(st) > i
        if i >= len(st) or (p != "*" and p != st[i]):
            return False
    return len(pt) == len(st)


class _Tag(msgspec.Struct):
    type: str = ""


_tag_decoder: Final = msgspec.msgpack.Decoder(_Tag)


@dataclass(frozen=True, slots=True)
class Summary:
    events: int
    aggregates: int
    signers: dict[str, int]  # actor name -> events signed
    errors: int
    warnings: int
    first_seq: int
    last_seq: int
    keyring_checked: bool
    refused: int = 0  # events the write policy refuses (every fold skipped them)
    pre_keyring: int = 0  # events before the log's keyring (roles not checked)
    keyring_seq: int = 0  # the keyring's first entry on the log (0: none)

    @property
    def ok(self) -> bool:
        return self.errors == 0


def _short(h: bytes) -> str:
    return h.hex()[:16] if h else "(none)"


def _seqs(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seq {first}-{last}"


@dataclass
class Auditor:
    """Checks records one at a time, in the order the stream delivered them."""

    keyring: Keyring | None = None  # a keyring file's subject lists, for pre-keyring events
    first_seq: int | None = None  # the stream's first sequence; None: trust the first record
    anchor: bytes | None = None  # the admin key the log's keyring must be rooted in
    policy: Policy = POLICY
    refused: dict[int, str] = field(default_factory=dict)  # seq -> the verdict's reason
    _next: int = 0
    _last_seen: int = 0
    _late: set[int] = field(default_factory=set)  # missing sequences that may still arrive
    _heads: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # subject -> (seq, hash)
    _signers: Counter[str] = field(default_factory=Counter)
    _events: int = 0
    _errors: int = 0
    _warnings: int = 0
    _pre_keyring: list[int] = field(default_factory=list)  # [first, last, count]
    gate: Gate = field(init=False)

    def __post_init__(self) -> None:
        self._next = self.first_seq or 0
        self.gate = Gate.pinned(self.anchor, policy=self.policy)

    def check(self, seq: int, subject: str, data: bytes) -> list[Finding]:
        out: list[Finding] = []
        self._events += 1
        self._order(seq, subject, out)
        digest = hashlib.sha256(data).digest()
        head = self._heads.get(subject)
        self._heads[subject] = (seq, digest)
        signed = True
        try:
            env = verify(data)
        except SignatureError:
            signed = False
            env = open_envelope(data)
            self._add(
                out,
                seq,
                "bad-signature",
                f"bad signature: event {env.id} ({env.type}) does not verify with the key "
                f"it names ({_short(env.key)}…, actor {env.actor!r})",
                subject,
            )
        except ValueError as exc:  # CodecError, and msgspec's UnicodeDecodeError on bad UTF-8
            self._add(out, seq, "unparseable", f"unparseable message on {subject}: {exc}", subject)
            self.refused[seq] = "unparseable"
            return out
        self._signers[env.actor] += 1
        if env.subject != subject:
            self._add(
                out,
                seq,
                "subject-mismatch",
                f"event {env.id} was written for {env.subject} but is stored on {subject}",
                subject,
            )
        self._chain(seq, subject, env, head, out)
        v = self.gate.judge(seq, subject, data, opened=env if signed else None)
        pre = isinstance(v, Allowed) and v.pre_keyring
        if pre:
            self._note_pre_keyring(seq)
        if self.keyring is not None and (pre or isinstance(v, Refused)):
            self._authorized(seq, subject, env, out)
        self._body(seq, subject, env, out)
        if isinstance(v, Refused):
            self.refused[seq] = v.reason
            if v.reason not in STRUCTURAL:  # the checks above named the structural ones
                self._add(out, seq, v.reason, f"refused: {env.type} by {env.actor!r}: "
                          f"{v.detail}", subject)  # fmt: skip
        return out

    def _note_pre_keyring(self, seq: int) -> None:
        if not self._pre_keyring:
            self._pre_keyring = [seq, seq, 0]
        self._pre_keyring[1] = seq
        self._pre_keyring[2] += 1

    def finish(self, last_seq: int | None = None) -> list[Finding]:
        """Call after the last record; the stream's `last_seq` reveals a missing tail."""
        out: list[Finding] = []
        if last_seq is not None and self._next == 0 and last_seq >= (self.first_seq or 1):
            self._next = self.first_seq or 1  # nothing was read at all
        if last_seq is not None and self._next and last_seq >= self._next:
            first = self._next
            self._add(
                out,
                first,
                "gap",
                f"{_seqs(first, last_seq)}: missing from the stream (deleted?); the stream "
                f"says its last seq is {last_seq}",
                last=last_seq,
            )
            self._next = last_seq + 1
        genesis = self.gate.keyring.genesis
        if genesis and self._pre_keyring:
            first, last, n = self._pre_keyring
            self._add(
                out,
                first,
                "pre-keyring",
                f"{_seqs(first, last)}: {n} events written before the keyring (its first entry "
                f"is seq {genesis}): signatures and chains checked, roles not",
                severity="warning",
            )
        return out

    def summary(self) -> Summary:
        return Summary(
            events=self._events,
            aggregates=len(self._heads),
            signers=dict(self._signers),
            errors=self._errors,
            warnings=self._warnings,
            first_seq=self.first_seq or 0,
            last_seq=self._last_seen,
            keyring_checked=self.keyring is not None or self.gate.keyring.genesis > 0,
            refused=len(self.refused),
            pre_keyring=self._pre_keyring[2] if self._pre_keyring else 0,
            keyring_seq=self.gate.keyring.genesis,
        )

    # -- checks -------------------------------------------------------------------------------

    def _order(self, seq: int, subject: str, out: list[Finding]) -> None:
        if self._next == 0:
            self._next = seq
        if seq == self._next:
            self._next = seq + 1
        elif seq > self._next:
            first, last = self._next, seq - 1
            if last - first < 10_000:  # keep the set small; a huge hole is reported, not tracked
                self._late.update(range(first, last + 1))
            prev = f"seq {self._last_seen}" if self._last_seen else "the start of the stream"
            self._add(
                out,
                first,
                "gap",
                f"{_seqs(first, last)}: missing from the stream (deleted?); {prev} is "
                f"followed by seq {seq}",
                last=last,
            )
            self._next = seq + 1
        elif seq in self._late:
            self._late.discard(seq)
            self._add(
                out,
                seq,
                "reordered",
                f"delivered out of order, after seq {self._last_seen}",
                subject,
            )
        else:
            self._add(
                out,
                seq,
                "duplicate",
                f"delivered again (already read), after seq {self._last_seen}",
                subject,
            )
        self._last_seen = max(self._last_seen, seq)

    def _chain(
        self,
        seq: int,
        subject: str,
        env: Envelope,
        head: tuple[int, bytes] | None,
        out: list[Finding],
    ) -> None:
        if head is None:
            if env.prev:
                self._add(
                    out,
                    seq,
                    "prev-mismatch",
                    f"first event on {subject} but links to a previous one "
                    f"({_short(env.prev)}…): an earlier event is missing",
                    subject,
                )
            return
        head_seq, head_hash = head
        if env.prev == head_hash:
            return
        if not env.prev:
            got = "an empty prev (starts a new chain)"
        elif len(env.prev) != HASH_LEN:
            got = f"a {len(env.prev)}-byte prev"
        else:
            got = f"{_short(env.prev)}…"
        self._add(
            out,
            seq,
            "prev-mismatch",
            f"prev hash does not match seq {head_seq}, the previous event on {subject}: "
            f"expected {_short(head_hash)}…, got {got}",
            subject,
        )

    def _authorized(self, seq: int, subject: str, env: Envelope, out: list[Finding]) -> None:
        assert self.keyring is not None
        who = self.keyring.get(env.key)
        if who is None:
            self._add(
                out,
                seq,
                "unknown-signer",
                f"signed by unknown key {_short(env.key)}… (claims actor {env.actor!r})",
                subject,
            )
            return
        if who.actor != env.actor:
            self._add(
                out,
                seq,
                "actor-mismatch",
                f"envelope names actor {env.actor!r} but the key belongs to {who.actor!r}",
                subject,
            )
        if not any(subject_matches(p, subject) for p in who.subjects):
            self._add(
                out,
                seq,
                "not-allowed",
                f"signer {who.actor!r} may not write {subject} "
                f"(allowed: {', '.join(who.subjects) or 'nothing'})",
                subject,
            )

    def _body(self, seq: int, subject: str, env: Envelope, out: list[Finding]) -> None:
        try:
            tag = _tag_decoder.decode(env.body).type
        except ValueError as exc:  # msgspec.DecodeError or UnicodeDecodeError
            self._add(out, seq, "bad-body", f"event {env.id}: body is not an event: {exc}", subject)
            return
        if tag != env.type:
            self._add(
                out,
                seq,
                "type-mismatch",
                f"event {env.id}: body tag {tag!r} does not match envelope type {env.type!r}",
                subject,
            )
            return
        try:
            known = decode_body(env)
        except ValueError as exc:
            self._add(out, seq, "bad-body", str(exc), subject)
            return
        if known is None:
            self._add(
                out,
                seq,
                "unknown-type",
                f"unknown event type {env.type!r} (written by a newer version?)",
                subject,
                severity="warning",
            )

    def _add(
        self,
        out: list[Finding],
        seq: int,
        code: str,
        reason: str,
        subject: str = "",
        *,
        last: int = 0,
        severity: Severity = "error",
    ) -> None:
        if severity == "error":
            self._errors += 1
        else:
            self._warnings += 1
        text = reason if reason.startswith("seq ") else f"seq {seq}: {reason}"
        out.append(
            Finding(
                seq=seq, code=code, reason=text, severity=severity, subject=subject, last_seq=last
            )
        )


def audit(
    records: Iterable[tuple[int, str, bytes]],
    *,
    keyring: Keyring | None = None,
    first_seq: int | None = None,
    last_seq: int | None = None,
    anchor: bytes | None = None,
) -> Iterator[Finding]:
    """Every finding for a whole log, in order; use `Auditor` directly to get the summary too."""
    auditor = Auditor(keyring=keyring, first_seq=first_seq, anchor=anchor)
    for seq, subject, data in records:
        yield from auditor.check(seq, subject, data)
    yield from auditor.finish(last_seq)
