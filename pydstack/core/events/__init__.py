"""Typed events, their signed and hash-chained envelope, and aggregate subjects."""

from ._base import Event, tag_of
from .apps import AppRegistered, AppRemoved, AppUpgraded
from .catalogue import (
    EVENT_TYPES,
    AnyEvent,
    AppEvent,
    CertEvent,
    CvmEvent,
    GatewayEvent,
    HostEvent,
    KeyringEvent,
    KmsEvent,
    VmEvent,
)
from .envelope import (
    CodecError,
    Envelope,
    SignatureError,
    Signer,
    decode_any,
    decode_body,
    encode_body,
    message_hash,
    open_envelope,
    seal,
    verify,
)
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
    PortAttrs,
    TunnelIpAllocated,
    TunnelIpReleased,
)
from .hosts import HostHeartbeat, HostJoined, HostLeft, HostVmPlaced, HostVmReleased
from .keyring import KeyRevoked, KeyringEntryAdded
from .kms import BootInfo, KeyDenied, KeyIssued, KeyRequested, KmsReplicaOnboarded, KmsRootCreated
from .subjects import ALL as ALL_SUBJECTS
from .subjects import SubjectError, kind_filter, parse_subject, subject
from .vms import (
    PortMap,
    VmBootError,
    VmBootProgress,
    VmExited,
    VmRejected,
    VmRemoved,
    VmRemoveRequested,
    VmRequested,
    VmResources,
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

__all__ = [
    "ALL_SUBJECTS", "EVENT_TYPES", "AcmeAccountCreated", "AnyEvent", "AppEvent", "AppRegistered",
    "AppRemoved", "AppUpgraded",
    "BootInfo", "CertEvent", "CertificateIssued", "CertificateRenewalFailed",
    "CertificateRenewalStarted", "CodecError",
    "CvmEvent", "CvmLiveness", "CvmRecycled", "CvmRegistered",
    "CvmRegistrationRefused", "CvmRemoved",
    "Envelope", "Event", "GatewayDomainAdded", "GatewayDomainRemoved",
    "GatewayEvent", "GatewayNodeDown", "GatewayNodeJoined", "GatewayNodeUp",
    "HostEvent", "HostHeartbeat", "HostJoined", "HostLeft", "HostVmPlaced", "HostVmReleased",
    "KeyDenied", "KeyIssued", "KeyRequested", "KeyRevoked", "KeyringEntryAdded", "KeyringEvent",
    "KmsEvent", "KmsReplicaOnboarded",
    "KmsRootCreated", "PortAttrs", "PortMap", "SignatureError", "Signer", "SubjectError",
    "TunnelIpAllocated", "TunnelIpReleased", "VmBootError",
    "VmBootProgress", "VmEvent", "VmExited", "VmRejected", "VmRemoveRequested", "VmRemoved",
    "VmRequested", "VmResources", "VmRestartExhausted", "VmRestartScheduled", "VmScheduled",
    "VmStartRequested", "VmStarted", "VmStopRequested", "VmStopped", "VmUpdateRejected",
    "VmUpdateRequested", "VmUpdated", "decode_any", "decode_body", "encode_body", "kind_filter",
    "message_hash", "open_envelope", "parse_subject", "seal", "subject", "tag_of", "verify",
]  # fmt: skip
