"""Events of the KMS cluster aggregate, subject ``dstack.kms.<cluster>``.

No key material is ever carried here: only public keys, hashes, BootInfo and verdicts.
"""

from __future__ import annotations

import msgspec

from ._base import Event


class BootInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the KMS learned from a verified quote + event log (dstack's BootInfo)."""

    tcb_status: str
    advisory_ids: tuple[str, ...] = ()
    mr_aggregated: str = ""
    os_image_hash: str = ""
    mr_system: str = ""
    app_id: str = ""
    compose_hash: str = ""
    instance_id: str = ""
    device_id: str = ""


class KmsRootCreated(Event, tag="KmsRootCreated", frozen=True):
    cluster: str
    ca_public_key: bytes
    k256_public_key: bytes
    attestation_hash: str = ""


class KeyRequested(Event, tag="KeyRequested", frozen=True):
    request_id: str
    app_id: str
    instance_id: str = ""
    quote_hash: str = ""


class KeyIssued(Event, tag="KeyIssued", frozen=True):
    request_id: str
    boot_info: BootInfo
    quote_hash: str
    backend: str
    verdict: str = ""


class KeyDenied(Event, tag="KeyDenied", frozen=True):
    request_id: str
    reason: str
    boot_info: BootInfo | None = None
    quote_hash: str = ""


class KmsReplicaOnboarded(Event, tag="KmsReplicaOnboarded", frozen=True):
    cluster: str
    replica_id: str
    attestation_hash: str = ""
