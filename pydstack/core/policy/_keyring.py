"""The keyring as a pure fold: which key is bound to which role, name and hosts, from when.

It is a timeline, not a snapshot: every binding keeps the stream sequence it took effect at,
so an event is judged by the keyring *as of its own sequence* even when the reader has already
folded later keyring events (a reader of one aggregate loads the whole keyring first). Usage::

    ring = Keyring.pinned(admin_key)           # the trust anchor this node pins
    ring = apply(ring, seq, signer_key, event)  # only for events the verdict allowed
    ring.binding(key, at_seq)                  # Binding | None

``genesis`` is the sequence of the first keyring entry: events before it were written before
the log had a keyring ("pre-keyring") and are checked for their signature only.
"""

from __future__ import annotations

from typing import Final

import msgspec
from msgspec.structs import replace

from pydstack.core.events import AnyEvent, KeyRevoked, KeyringEntryAdded

from ._table import ADMIN, NAME, Policy

KEY_LEN: Final = 32


class Binding(msgspec.Struct, frozen=True):
    """A key's binding from stream sequence ``since`` on (``revoked``: refused from then)."""

    since: int
    name: str
    role: str
    hosts: tuple[str, ...] = ()
    revoked: bool = False


class Keyring(msgspec.Struct, frozen=True, kw_only=True):
    """Bindings per key (oldest first), the anchor, and where the keyring starts."""

    anchor: bytes = b""  # the admin key the first entry must be signed by (pinned or learnt)
    pinned: bool = False  # anchor given by the node (else: the first entry's signer, TOFU)
    genesis: int = 0  # seq of the first entry; 0: no keyring on the log (yet)
    seq: int = 0  # the last keyring event folded
    bindings: dict[bytes, tuple[Binding, ...]] = msgspec.field(default_factory=dict)

    @classmethod
    def pinned_to(cls, anchor: bytes | None) -> Keyring:
        return cls(anchor=anchor, pinned=True) if anchor else cls()

    def pre_keyring(self, seq: int) -> bool:
        """True for an event written before the keyring's first entry."""
        return self.genesis == 0 or seq < self.genesis

    def binding(self, key: bytes, seq: int) -> Binding | None:
        """The key's binding in force at ``seq`` (None: unknown then)."""
        for b in reversed(self.bindings.get(key, ())):
            if b.since < seq:
                return b
        return None

    def is_admin(self, key: bytes, seq: int) -> bool:
        if self.anchor and key == self.anchor:
            return True
        b = self.binding(key, seq)
        return b is not None and not b.revoked and b.role == ADMIN

    def names(self) -> dict[bytes, Binding]:
        """The latest binding of every key (for display)."""
        return {k: v[-1] for k, v in self.bindings.items() if v}


def entry_error(
    ring: Keyring, policy: Policy, signer: bytes, event: AnyEvent, seq: int
) -> tuple[str, str] | None:
    """Why a keyring event stored at ``seq`` cannot be folded, as ``(code, detail)``: code
    ``not-allowed`` (wrong signer) or ``bad-keyring-entry`` (wrong content). None: it can."""
    if ring.genesis == 0:  # the first entry: the trust anchor's, or (unpinned) an admin's own
        if ring.pinned and signer != ring.anchor:
            return "not-allowed", "the first keyring entry must be signed by the pinned admin key"
        if not ring.pinned and not (
            isinstance(event, KeyringEntryAdded) and event.key == signer and event.role == ADMIN
        ):
            return "not-allowed", "the first keyring entry must be the admin key's own"
    elif not ring.is_admin(signer, seq):
        return "not-allowed", "only an admin key may change the keyring"
    bad = _content_error(ring, policy, event)
    return None if bad is None else ("bad-keyring-entry", bad)


def _content_error(ring: Keyring, policy: Policy, event: AnyEvent) -> str | None:
    match event:
        case KeyringEntryAdded(key=key, name=name, role=role, hosts=hosts):
            if len(key) != KEY_LEN:
                return f"key has {len(key)} bytes, expected {KEY_LEN}"
            if role not in policy.roles:
                return f"unknown role {role!r}"
            if not NAME.match(name):
                return f"bad name {name!r}"
            if hosts and role not in policy.host_bound:
                return f"role {role!r} is not bound to hosts"
            if ring.anchor and key == ring.anchor and role != ADMIN:
                return "the anchor key stays admin"
        case KeyRevoked(key=key):
            if ring.anchor and key == ring.anchor:
                return "the admin key the keyring is anchored to cannot be revoked"
            if key not in ring.bindings:
                return "revokes a key the keyring does not hold"
        case _:
            return "not a keyring event"
    return None


def apply(ring: Keyring, seq: int, signer: bytes, event: AnyEvent) -> Keyring:
    """Fold one allowed keyring event (stored at ``seq``, signed by ``signer``)."""
    if seq <= ring.seq:
        return ring  # already folded (a reader that loaded the keyring first)
    bindings = dict(ring.bindings)
    match event:
        case KeyringEntryAdded(key=key, name=name, role=role, hosts=hosts):
            bindings[key] = (*bindings.get(key, ()), Binding(seq, name, role, tuple(hosts)))
        case KeyRevoked(key=key):
            last = bindings[key][-1]
            bindings[key] = (*bindings[key], replace(last, since=seq, revoked=True))
        case _:
            return ring
    first = ring.genesis == 0
    return replace(
        ring,
        bindings=bindings,
        seq=seq,
        genesis=seq if first else ring.genesis,
        anchor=ring.anchor or signer,
    )


def additions(
    ring: Keyring, wanted: list[tuple[bytes, str, str, tuple[str, ...]]]
) -> list[KeyringEntryAdded]:
    """The entries that bind every ``(key, name, role, hosts)`` wanted (hosts added to what a
    key already holds), the admin's own entry first on a log without a keyring. A revoked key
    stays revoked: only an explicit new entry binds it again."""
    out: list[KeyringEntryAdded] = []
    for key, name, role, hosts in wanted:
        now = ring.bindings.get(key, ())
        last = now[-1] if now else None
        if last is not None and last.revoked:
            continue
        merged = tuple(dict.fromkeys((*(last.hosts if last else ()), *hosts)))
        if last is not None and (last.name, last.role, last.hosts) == (name, role, merged):
            continue
        out.append(KeyringEntryAdded(key=key, name=name, role=role, hosts=merged))
    if ring.genesis == 0:
        out.sort(key=lambda e: e.role != ADMIN)  # the admin's own entry is the first
    return out
