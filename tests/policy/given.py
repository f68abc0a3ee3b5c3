"""Signers of every role and a log builder for the write-policy tests (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydstack.core.events import (
    Event,
    KeyringEntryAdded,
    Signer,
    VmRequested,
    VmResources,
    VmScheduled,
    message_hash,
    seal,
)
from pydstack.core.policy import KEYRING_SUBJECT


def signer(name: str, n: int) -> Signer:
    return Signer.from_private_bytes(name, bytes([n]) * 32)


ADMIN = signer("admin", 1)
OPERATOR = signer("operator", 2)
SCHEDULER = signer("scheduler", 3)
VMM1 = signer("vmm-h1", 4)  # acts for host h1
VMM2 = signer("vmm-h2", 5)  # acts for host h2
KMS = signer("kms", 6)
GATEWAY = signer("gateway", 7)
STRANGER = signer("stranger", 8)  # in no keyring
TENANT_A = signer("tenant-a", 9)  # tenants: own the apps they register
TENANT_B = signer("tenant-b", 10)

ROLE_OF = {ADMIN: "admin", OPERATOR: "operator", SCHEDULER: "scheduler", VMM1: "vmm",
           VMM2: "vmm", KMS: "kms", GATEWAY: "gateway", TENANT_A: "tenant",
           TENANT_B: "tenant"}  # fmt: skip
HOSTS_OF = {VMM1: ("h1",), VMM2: ("h2",)}
RES = VmResources(vcpu=1, memory_mb=512)


def entry(s: Signer, role: str = "") -> KeyringEntryAdded:
    """The entry binding ``s`` to its role (``role``: another one, e.g. for a stranger)."""
    return KeyringEntryAdded(key=s.public_key, name=s.actor, role=role or ROLE_OF[s],
                             hosts=HOSTS_OF.get(s, ()))  # fmt: skip


def requested(vm: str, host: str = "") -> VmRequested:
    return VmRequested(vm_id=vm, app_id="app", name=vm, resources=RES, host=host)


def placed(vm: str, host: str) -> VmScheduled:
    return VmScheduled(vm_id=vm, host=host, cid=1000)


@dataclass
class Log:
    """Records ``(seq, subject, data)`` as a store would hold them, chained per subject."""

    records: list[tuple[int, str, bytes]] = field(default_factory=list)
    heads: dict[str, bytes] = field(default_factory=dict)

    def add(self, by: Signer, subject: str, event: Event, *, zero_sig: bool = False) -> int:
        seq = len(self.records) + 1
        data = seal(by, event, subject=subject, event_id=f"e{seq}", time_ns=seq,
                    correlation="c", prev=self.heads.get(subject, b""))  # fmt: skip
        if zero_sig:
            data = data[:-64] + bytes(64)
        self.heads[subject] = message_hash(data)
        self.records.append((seq, subject, data))
        return seq

    def keyring(self, *signers: Signer) -> int:
        """The admin's genesis, then an entry per signer; returns the genesis seq."""
        first = self.add(ADMIN, KEYRING_SUBJECT, entry(ADMIN))
        for s in signers:
            self.add(ADMIN, KEYRING_SUBJECT, entry(s))
        return first

    def everyone(self) -> int:
        return self.keyring(OPERATOR, SCHEDULER, VMM1, VMM2, KMS, GATEWAY)
