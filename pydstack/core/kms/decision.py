"""The KMS decision: from checked evidence and a backend verdict to the events on the log. Pure.

Only a request whose evidence verified (a genuine quote bound to the client's TLS key, fresh,
its logs replaying to the quote) reaches the log; any other is refused by the actor with a
metric and a log line, and no event (the log holds nothing unauthenticated, and a
``KeyRequested`` is bounded: attestation <= 256 KiB, vm_config <= 16 KiB). Such a request
produces exactly two events, in this order: ``KeyRequested`` (the evidence: attestation, quote
hash, policy, time) and then either ``KeyIssued`` (BootInfo, backend, verdict) or
``KeyDenied`` (the policy's reasons, or the backend's). Neither ever carries key material: keys
are re-derivable from the root keys and the BootInfo. The two are ordinary appends (an atomic
batch costs the server an fsync, ~10x an append); a KMS killed between them leaves a
``KeyRequested`` without a decision, which the restarted KMS closes with `abandoned` (a
``KeyDenied``: the client was never answered, so no key left the KMS).

    requested = key_requested(req)              # stored while the backend is asked
    outcome = decide(req, reasons=[], boot=boot, verdict=verdict, backend="webhook")
    denied = abandoned(requested)               # on restart, for a dangling request
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgspec

from pydstack.core.events.kms import BootInfo, KeyDenied, KeyIssued, KeyRequested

from .auth import AuthVerdict

APP_ID_LEN = 20


class KeyRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One incoming request's verified evidence, as the actor gathered it."""

    request_id: str
    method: str  # GetAppKey, GetKmsKey, SignCert
    attestation: bytes = b""  # SCALE V0 attestation from the client certificate
    quote: bytes = b""
    vm_config: str = ""
    policy: str = ""
    verified_at: int = 0
    kms_instance: str = ""  # which replica takes it (KmsSettings.instance_id)
    # Hex ids the attestation's runtime events state (verified: they replayed to RTMR3), so a
    # policy or backend refusal names what was asked for.
    app_id: str = ""
    instance_id: str = ""
    usage: str = ""  # SignCert: the certificate usage decided for (`KeyRequested.usage`)


def quote_hash(quote: bytes) -> str:
    """How the log names a quote: hex sha256 of its bytes ("" when there is none)."""
    return hashlib.sha256(quote).hexdigest() if quote else ""


def boot_info(
    *,
    tcb_status: str,
    advisory_ids: Sequence[str],
    app_id: bytes,
    compose_hash: bytes,
    instance_id: bytes,
    device_id: bytes,
    mr_system: bytes,
    mr_aggregated: bytes,
    os_image_hash: bytes,
) -> BootInfo:
    """dstack's BootInfo with every byte field as lower-case hex."""
    return BootInfo(
        tcb_status=tcb_status,
        advisory_ids=tuple(advisory_ids),
        mr_aggregated=mr_aggregated.hex(),
        os_image_hash=os_image_hash.hex(),
        mr_system=mr_system.hex(),
        app_id=app_id.hex(),
        compose_hash=compose_hash.hex(),
        instance_id=instance_id.hex(),
        device_id=device_id.hex(),
    )


def webhook_body(boot: BootInfo) -> dict[str, object]:
    """The `/bootAuth/*` request body as dstack v0.5.11's KMS posts it (serde of its
    `BootInfo`: camelCase, these fields in this order, bytes as lower-case hex without 0x)."""
    return {
        "attestationMode": "dstack-tdx",
        "mrAggregated": boot.mr_aggregated,
        "osImageHash": boot.os_image_hash,
        "mrSystem": boot.mr_system,
        "appId": boot.app_id,
        "composeHash": boot.compose_hash,
        "instanceId": boot.instance_id,
        "deviceId": boot.device_id,
        "keyProviderInfo": boot.key_provider_info,
        "tcbStatus": boot.tcb_status,
        "advisoryIds": list(boot.advisory_ids),
    }


def boot_info_from_webhook(body: dict[str, object]) -> BootInfo:
    """The inverse of `webhook_body` (a webhook server's view); missing fields are empty."""

    def s(name: str) -> str:
        v = body.get(name, "")
        return v.lower().removeprefix("0x") if isinstance(v, str) else ""

    adv = body.get("advisoryIds", [])
    return BootInfo(
        tcb_status=str(body.get("tcbStatus", "")),
        advisory_ids=tuple(str(a) for a in adv) if isinstance(adv, list) else (),
        mr_aggregated=s("mrAggregated"),
        os_image_hash=s("osImageHash"),
        mr_system=s("mrSystem"),
        app_id=s("appId"),
        compose_hash=s("composeHash"),
        instance_id=s("instanceId"),
        device_id=s("deviceId"),
        key_provider_info=s("keyProviderInfo"),
    )


def precheck(boot: BootInfo | None, reasons: Sequence[str]) -> list[str]:
    """Reasons to refuse before asking a backend: bad evidence, or no usable app id."""
    out = list(reasons)
    if boot is not None and not out and len(boot.app_id) != 2 * APP_ID_LEN:
        out.append(f"app_id must be {APP_ID_LEN} bytes, got {len(boot.app_id) // 2}")
    if boot is None and not out:
        out.append("no boot info could be built from the attestation")
    return out


ABANDONED = "KMS restarted before deciding; the client got no answer and no key"


def key_requested(req: KeyRequest) -> KeyRequested:
    """The first event of a request: what was presented and verified, before it is decided."""
    return KeyRequested(
        request_id=req.request_id,
        app_id=req.app_id,
        instance_id=req.instance_id,
        quote_hash=quote_hash(req.quote),
        attestation=req.attestation,
        vm_config=req.vm_config,
        policy=req.policy,
        verified_at=req.verified_at,
        method=req.method,
        kms_instance=req.kms_instance,
        usage=req.usage,
    )


def abandoned(requested: KeyRequested) -> KeyDenied:
    """The decision that closes a request its KMS died before deciding."""
    return KeyDenied(
        request_id=requested.request_id, reason=ABANDONED, quote_hash=requested.quote_hash
    )


def decide(
    req: KeyRequest,
    *,
    reasons: Sequence[str],
    boot: BootInfo | None,
    verdict: AuthVerdict | None,
    backend: str,
    tee: str = "",
) -> KeyIssued | KeyDenied:
    """The decision closing `req` (its second event). `reasons` are the policy's refusal
    reasons for its verified evidence (debug, TCB status, advisories, measurements); `verdict`
    is None when the backend was not asked (evidence already refused); `tee`: "tdx" or
    "simulated", the root the quote verified under (recorded in KeyIssued)."""
    qh = quote_hash(req.quote)
    refused = precheck(boot, reasons)
    if refused:
        reason = "attestation refused: " + "; ".join(refused)
        return KeyDenied(request_id=req.request_id, reason=reason, boot_info=boot, quote_hash=qh)
    assert boot is not None  # precheck refuses a missing BootInfo
    if verdict is None or not verdict.is_allowed:
        why = verdict.reason if verdict is not None and verdict.reason else "no reason given"
        return KeyDenied(
            request_id=req.request_id,
            reason=f"backend {backend} denied: {why}",
            boot_info=boot,
            quote_hash=qh,
        )
    return KeyIssued(
        request_id=req.request_id,
        boot_info=boot,
        quote_hash=qh,
        backend=backend,
        verdict="allowed" + (f": {verdict.reason}" if verdict.reason else ""),
        gateway_app_id=verdict.gateway_app_id,
        tee=tee,
    )


def backend_failure(backend: str, error: str) -> AuthVerdict:
    """A backend that could not answer refuses: fail closed, with the error as the reason."""
    return AuthVerdict(False, f"backend {backend} unavailable: {error}")
