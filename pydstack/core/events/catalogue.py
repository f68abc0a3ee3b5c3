"""Every event type pydstack knows, and the union that decodes any of them.

Adding a type: define it in its aggregate's module with a new tag, then list it here.
Never reuse or change a tag (``docs/schema-evolution.md``).
"""

from __future__ import annotations

from typing import Final

from .actors import ComponentRestarted
from .apps import AppComposeRevoked, AppRegistered, AppRemoved, AppUpgraded
from .gateways import (
    AcmeAccountCreated,
    CertificateIssued,
    CertificateRenewalFailed,
    CertificateRenewalStarted,
    CvmLiveness,
    CvmRecycled,
    CvmRegistered,
    CvmRegistrationRefused,
    CvmRemoved,
    GatewayDomainAdded,
    GatewayDomainRemoved,
    GatewayNodeDown,
    GatewayNodeJoined,
    GatewayNodeUp,
    TunnelIpAllocated,
    TunnelIpReleased,
)
from .hosts import HostHeartbeat, HostJoined, HostLeft, HostVmPlaced, HostVmReleased
from .images import ImageRegistered, ImageRevoked
from .keyring import KeyRevoked, KeyringEntryAdded
from .kms import KeyDenied, KeyIssued, KeyRequested, KmsReplicaOnboarded, KmsRootCreated
from .vms import (
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
)

AppEvent = AppRegistered | AppUpgraded | AppRemoved | AppComposeRevoked
VmEvent = (
    VmRequested
    | VmScheduled
    | VmRejected
    | VmStartRequested
    | VmStopRequested
    | VmRemoveRequested
    | VmStarted
    | VmBootProgress
    | VmBootError
    | VmExited
    | VmStopped
    | VmRemoved
    | VmRestartScheduled
    | VmRestartExhausted
    | VmUpdateRequested
    | VmUpdated
    | VmUpdateRejected
)
HostEvent = HostJoined | HostHeartbeat | HostLeft | HostVmPlaced | HostVmReleased
KmsEvent = KmsRootCreated | KeyRequested | KeyIssued | KeyDenied | KmsReplicaOnboarded
GatewayEvent = (
    GatewayNodeJoined | GatewayNodeDown | GatewayNodeUp | TunnelIpAllocated | TunnelIpReleased
)
CertEvent = (
    GatewayDomainAdded
    | GatewayDomainRemoved
    | AcmeAccountCreated
    | CertificateRenewalStarted
    | CertificateIssued
    | CertificateRenewalFailed
)
CvmEvent = CvmRegistered | CvmLiveness | CvmRecycled | CvmRemoved | CvmRegistrationRefused
KeyringEvent = KeyringEntryAdded | KeyRevoked
ImageEvent = ImageRegistered | ImageRevoked
ActorEvent = ComponentRestarted

AnyEvent = (
    AppEvent
    | VmEvent
    | HostEvent
    | KmsEvent
    | GatewayEvent
    | CvmEvent
    | CertEvent
    | KeyringEvent
    | ImageEvent
    | ActorEvent
)

EVENT_TYPES: Final[tuple[type[AnyEvent], ...]] = (
    AppRegistered, AppUpgraded, AppRemoved, AppComposeRevoked,
    VmRequested, VmScheduled, VmRejected, VmStartRequested, VmStopRequested, VmRemoveRequested,
    VmStarted, VmBootProgress, VmBootError, VmExited, VmStopped, VmRemoved,
    VmRestartScheduled, VmRestartExhausted, VmUpdateRequested, VmUpdated, VmUpdateRejected,
    HostJoined, HostHeartbeat, HostLeft, HostVmPlaced, HostVmReleased,
    KmsRootCreated, KeyRequested, KeyIssued, KeyDenied, KmsReplicaOnboarded,
    GatewayNodeJoined, GatewayNodeDown, GatewayNodeUp,
    CvmRegistered, CvmLiveness, CvmRecycled,
    TunnelIpAllocated, TunnelIpReleased, CvmRemoved, CvmRegistrationRefused,
    GatewayDomainAdded, GatewayDomainRemoved, AcmeAccountCreated, CertificateRenewalStarted,
    CertificateIssued, CertificateRenewalFailed,
    KeyringEntryAdded, KeyRevoked,
    ImageRegistered, ImageRevoked,
    ComponentRestarted,
)  # fmt: skip
