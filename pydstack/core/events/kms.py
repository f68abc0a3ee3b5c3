"""Events of the KMS cluster aggregate, subject ``dstack.kms.<cluster>``.

No key material is ever carried here: only public keys, hashes, BootInfo and verdicts.
"""

from __future__ import annotations

import msgspec

from ._base import Event


class BootInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What the KMS learned from a verified quote + event log (dstack's BootInfo). Defaults
    are omitted as in events, so a field added later leaves older encodings' values alone."""

    tcb_status: str
    advisory_ids: tuple[str, ...] = ()
    mr_aggregated: str = ""
    os_image_hash: str = ""
    mr_system: str = ""
    app_id: str = ""
    compose_hash: str = ""
    instance_id: str = ""
    device_id: str = ""
    # Added: the `key-provider` runtime event's payload (dstack's BootInfo.key_provider_info),
    # "" when the attestation has none (a first boot asks for keys before emitting it) and for
    # SignCert, which decides on the boot-time view as dstack does.
    key_provider_info: str = ""


class KmsRootCreated(Event, tag="KmsRootCreated", frozen=True):
    cluster: str
    ca_public_key: bytes
    k256_public_key: bytes
    attestation_hash: str = ""
    # Added: the public certificates every replica serves byte for byte (no private key).
    ca_cert_pem: str = ""
    temp_ca_cert_pem: str = ""
    instance_id: str = ""
    # SCALE V0; report_data binds ca_spki and k256_pub as dstack does (kms_bootstrap_report_data;
    # roots created before that: sha512(b"pydstack-kms-root:" || ca_spki || k256_pub))
    attestation: bytes = b""


class KeyRequested(Event, tag="KeyRequested", frozen=True):
    request_id: str
    app_id: str
    instance_id: str = ""
    quote_hash: str = ""
    # Added: the evidence and the rules a decision relied on, so an auditor can re-check it.
    # `attestation` is dstack's SCALE V0 attestation (quote + event logs + sys config): public.
    # Appended only once that attestation verified, and bounded: the KMS refuses an attestation
    # over 256 KiB or a vm_config over 16 KiB before decoding them.
    attestation: bytes = b""
    vm_config: str = ""
    policy: str = ""  # JSON of the verifier policy applied
    verified_at: int = 0  # unix seconds the quote was verified at
    method: str = ""  # the RPC: GetAppKey, GetKmsKey, SignCert
    # Added: the KMS instance that took the request. Replicas may share one identity (one
    # actor name), so a restarted instance closes only the requests its previous life took.
    kms_instance: str = ""
    # Added: SignCert only, the certificate usage the decision is for ("server", "client",
    # "server+client", "none"): its grant is reused per (instance, compose hash, usage).
    usage: str = ""
    # Added (issue 18.2, lean events): the hex sha256 of the SCALE attestation when it is
    # stored in the log's evidence bucket (a JetStream Object Store, object name = this hash)
    # instead of inline; `attestation` is then empty. "": the attestation is inline (every
    # event written before the field, and a KMS running without the bucket).
    attestation_sha256: str = ""


class KeyIssued(Event, tag="KeyIssued", frozen=True):
    request_id: str
    boot_info: BootInfo
    quote_hash: str
    backend: str
    verdict: str = ""
    gateway_app_id: str = ""  # added: the backend's answer, returned with the keys
    # added: the image check the KMS made before asking the backend (core.measure.check)
    image_check: str = ""
    # added (issue 15.8): the TEE the quote came from: "tdx" (Intel's root) or "simulated"
    # (the dev PKI's: attestation proved nothing); "" before the field
    tee: str = ""


class KeyDenied(Event, tag="KeyDenied", frozen=True):
    request_id: str
    reason: str
    boot_info: BootInfo | None = None
    quote_hash: str = ""


class KmsReplicaOnboarded(Event, tag="KmsReplicaOnboarded", frozen=True):
    cluster: str
    replica_id: str
    attestation_hash: str = ""
    boot_info: BootInfo | None = None  # added: the replica's attested identity
    request_id: str = ""  # added: the GetKmsKey request that carried the root keys
    # added: what allowed it ("token", "mr_td:<hex>", "mr_aggregated:<hex>", "backend:<name>");
    # never the token itself
    authorization: str = ""
