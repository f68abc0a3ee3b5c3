"""Who may write what: roles, their NATS subjects, and (event type x subject kind) -> roles.

Two layers of the same rule. :data:`ROLES` is what NATS can enforce at publish time (subject
wildcards per role; the embedded server's permissions are built from it). :data:`WRITERS` is
what every fold enforces at read time, per event type and aggregate kind, plus the owner rule
of host-bound roles (:data:`HOST_BOUND`): a host's VMM writes only its own host's aggregate and
the VMs placed on (or pinned to) it, and names no other host in what it writes.

The table lists exactly what pydstack's writers append today (see docs/architecture.md,
"Write policy"); a type absent from it may be written by nobody once the log has a keyring.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from pydstack.core.events import (
    AcmeAccountCreated,
    AppComposeRevoked,
    AppRegistered,
    AppRemoved,
    AppUpgraded,
    CertificateIssued,
    CertificateRenewalFailed,
    CertificateRenewalStarted,
    ComponentRestarted,
    CvmLiveness,
    CvmRecycled,
    CvmRegistered,
    CvmRegistrationRefused,
    CvmRemoved,
    Event,
    GatewayDomainAdded,
    GatewayDomainRemoved,
    GatewayNodeDown,
    GatewayNodeJoined,
    GatewayNodeUp,
    HostHeartbeat,
    HostJoined,
    HostLeft,
    HostVmPlaced,
    HostVmReleased,
    ImageRegistered,
    ImageRevoked,
    KeyDenied,
    KeyIssued,
    KeyRequested,
    KeyRevoked,
    KeyringEntryAdded,
    KmsReplicaOnboarded,
    KmsRootCreated,
    TunnelIpAllocated,
    TunnelIpReleased,
    VmBootError,
    VmBootProgress,
    VmExited,
    VmRejected,
    VmRemoved,
    VmRemoveRequested,
    VmRequested,
    VmRestartExhausted,
    VmRestartScheduled,
    VmScheduled,
    VmStarted,
    VmStartRequested,
    VmStopped,
    VmStopRequested,
    VmUpdated,
    VmUpdateRejected,
    VmUpdateRequested,
    tag_of,
)


@dataclass(frozen=True, slots=True)
class Role:
    """What an actor of this role may publish (NATS subjects) and whether it manages the stream."""

    subjects: tuple[str, ...]
    admin: bool = False
    doc: str = ""


ADMIN: Final = "admin"
OPERATOR: Final = "operator"
SCHEDULER: Final = "scheduler"
VMM: Final = "vmm"
KMS: Final = "kms"
GATEWAY: Final = "gateway"
AUDITOR: Final = "auditor"
TENANT: Final = "tenant"

# The NATS side: subjects each role may publish to (the embedded server's permissions).
ROLES: Final[dict[str, Role]] = {
    ADMIN: Role(("dstack.>",), admin=True, doc="`pydstack up`: the stream and the keyring"),
    OPERATOR: Role(("dstack.app.*", "dstack.vm.*"), doc="the CLI, the dashboard: commands"),
    SCHEDULER: Role(("dstack.vm.*", "dstack.host.*"), doc="VmScheduled/VmRejected, placements"),
    VMM: Role(("dstack.vm.*", "dstack.host.*"), doc="a host: HostJoined, VmStarted, VmExited…"),
    KMS: Role(("dstack.kms.*",), doc="KeyIssued/KeyDenied, root keys, replicas"),
    GATEWAY: Role(("dstack.gateway.*", "dstack.cvm.*"), doc="gateway nodes, CVM registration"),
    AUDITOR: Role((), doc="reads everything, writes nothing"),
    TENANT: Role(
        ("dstack.app.*", "dstack.vm.*"),
        doc="`pydstack tenant add`: its own apps and their VMs (owner rule)",
    ),
}

# Roles that may put blobs into the evidence bucket (JetStream Object Store beside the stream,
# ``adapters.nats.objectstore``): the KMS's attestations, named by sha256 from KeyRequested.
# Everyone who reads the stream may read the bucket; no other role may write it.
BLOB_WRITERS: Final = frozenset({KMS})

# Roles whose keys are bound to hosts (the keyring entry names them).
HOST_BOUND: Final = frozenset({VMM})
# Roles whose VM commands are bound to the apps they own (see the app owner rule in _verdict).
APP_BOUND: Final = frozenset({TENANT})
# Roles that may write any app's events whoever owns it (every other role: only its own apps).
APP_ADMINS: Final = frozenset({ADMIN})
# Body fields that name a host: a host-bound writer may only name one of its own.
HOST_FIELDS: Final = ("host", "host_id")
# Body field that must equal the aggregate id of the subject it is stored on, per kind.
AGGREGATE_FIELDS: Final[Mapping[str, str]] = {
    "vm": "vm_id", "host": "host_id", "app": "app_id", "image": "os_image_hash",
    "actor": "component",
}  # fmt: skip

NAME: Final = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def _rows(
    kind: str, roles: frozenset[str], *types: type[Event]
) -> dict[tuple[str, str], frozenset[str]]:
    return {(tag_of(t), kind): roles for t in types}


_COMMANDS: Final = frozenset({OPERATOR, ADMIN, TENANT})  # + the app owner rule
# VMM: its API, its own host's VMs; tenant: the VMs of its own apps
_VM_COMMANDS: Final = frozenset({OPERATOR, ADMIN, VMM, TENANT})

WRITERS: Final[Mapping[tuple[str, str], frozenset[str]]] = {
    # commands (CLI, dashboard): the operator's and the tenants', under the app owner rule
    **_rows("app", _COMMANDS, AppRegistered, AppUpgraded, AppRemoved, AppComposeRevoked),
    **_rows("vm", _VM_COMMANDS, VmRequested, VmStartRequested, VmStopRequested,
            VmRemoveRequested, VmUpdateRequested),
    # the scheduler's decisions (a VMM re-places its own VM on an accepted update)
    **_rows("vm", frozenset({SCHEDULER}), VmScheduled, VmRejected),
    **_rows("host", frozenset({SCHEDULER, VMM}), HostVmPlaced),
    # what a host's VMM did or saw, on its own host and its own VMs
    **_rows("vm", frozenset({VMM}), VmStarted, VmBootProgress, VmBootError, VmExited,
            VmStopped, VmRemoved, VmRestartScheduled, VmRestartExhausted, VmUpdated,
            VmUpdateRejected),
    **_rows("host", frozenset({VMM}), HostJoined, HostHeartbeat, HostLeft, HostVmReleased),
    # the KMS cluster
    **_rows("kms", frozenset({KMS}), KmsRootCreated, KeyRequested, KeyIssued, KeyDenied,
            KmsReplicaOnboarded),
    # gateway nodes: the cluster ledger, its domains and ACME accounts, and CVM records
    **_rows("gateway", frozenset({GATEWAY}), GatewayNodeJoined, GatewayNodeDown, GatewayNodeUp,
            TunnelIpAllocated, TunnelIpReleased, GatewayDomainAdded, GatewayDomainRemoved,
            AcmeAccountCreated, CertificateRenewalStarted, CertificateIssued,
            CertificateRenewalFailed),
    **_rows("cvm", frozenset({GATEWAY}), CvmRegistered, CvmLiveness, CvmRecycled, CvmRemoved,
            CvmRegistrationRefused),
    # the keyring itself (its first entry: the pinned admin key, see Keyring)
    **_rows("keyring", frozenset({ADMIN}), KeyringEntryAdded, KeyRevoked),
    # what the KMS measures requests against: an admin decision, never a host's
    **_rows("image", frozenset({ADMIN}), ImageRegistered, ImageRevoked),
    # `up` about its own components (a restarted nats-server): under its admin key
    **_rows("actor", frozenset({ADMIN}), ComponentRestarted),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Policy:
    """The read-time rule as data: writers per (type tag, kind), and the host-bound roles."""

    writers: Mapping[tuple[str, str], frozenset[str]] = field(default_factory=lambda: WRITERS)
    host_bound: frozenset[str] = HOST_BOUND
    app_bound: frozenset[str] = APP_BOUND
    app_admins: frozenset[str] = APP_ADMINS
    roles: frozenset[str] = frozenset(ROLES)

    def may_write(self, role: str, event_type: str, kind: str) -> bool:
        return role in self.writers.get((event_type, kind), ())


POLICY: Final = Policy()
