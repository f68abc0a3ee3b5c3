"""Events of the keyring, subject ``dstack.keyring.<cluster>`` (one keyring per stream).

The keyring binds Ed25519 public keys (the ``key`` of envelopes) to a role and a name, and a
host-bound role (``vmm``) to the hosts it acts for. Only the cluster's admin writes it: the
first entry must be signed by the admin key every node pins (the trust anchor), later entries
by a key the keyring holds as admin. An entry for a key already bound replaces its binding
from that position on; a revoked key's later events are refused, its earlier ones stay valid.
"""

from __future__ import annotations

from ._base import Event


class KeyringEntryAdded(Event, tag="KeyringEntryAdded", frozen=True):
    key: bytes  # Ed25519 public key (32 bytes)
    name: str  # the identity's name (the actor it signs as)
    role: str  # one of pydstack.core.policy.ROLES
    hosts: tuple[str, ...] = ()  # the hosts a host-bound role (vmm) may act for


class KeyRevoked(Event, tag="KeyRevoked", frozen=True):
    key: bytes
    reason: str = ""
