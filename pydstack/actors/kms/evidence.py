"""Check the evidence a key request carries and turn it into dstack's BootInfo.

Evidence is an RA-TLS client certificate (GetAppKey, GetKmsKey) or a CSR's public key plus
attestation (SignCert). Checks, each with its own reason: the quote verifies under the policy
(dcap-qvl chain, TCB status, advisories, debug), the event log replays to the quote's RTMRs,
the runtime events replay to RTMR3, the quote's report_data binds the presented public key
(`sha512("ratls-cert:" || SPKI)`), and the certificate is fresh (issued within `max_age`).

Two steps, so the KMS can put a request on the log while its evidence is being verified:
`present_certificate` / `present_csr` decode what the client presented (cheap: what
`KeyRequested` records, with the app and instance ids the runtime events *claim*), then
`verify_presented` checks it (dcap-qvl and the replays: the CPU-heavy part).

    p = present_certificate(der)
    ev = verify_presented(p, await collateral(p.quote), policy=pol, now=now, root_ca_der=dev_root,
                          max_age=3600, vm_config=cfg)
    ev.reasons, ev.boot
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Awaitable, Callable

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pydstack.adapters.tdx.attestation import (
    Attestation,
    AttestationDecodeError,
    decode_attestation,
    encode_attestation,
)
from pydstack.adapters.tdx.collateral import Collateral
from pydstack.adapters.tdx.eventlog import EventLogError, replay_runtime_events
from pydstack.adapters.tdx.identity import (
    AppInfo,
    decode_app_info,
    find_event_payload,
    measurements_of,
)
from pydstack.adapters.tdx.ratls import (
    RaTlsError,
    binding_reasons,
    extract_attestation_raw,
    pck_ppid,
)
from pydstack.adapters.tdx.verify import Policy, verify_quote
from pydstack.core.kms import BootInfo, boot_info, quote_hash

CollateralSource = Callable[[bytes], Awaitable[Collateral]]


class Evidence(msgspec.Struct, frozen=True):
    reasons: tuple[str, ...]
    boot: BootInfo | None
    attestation: bytes  # SCALE V0 (what KeyRequested records)
    quote: bytes
    app_info: AppInfo | None = None


@functools.lru_cache(maxsize=256)
def _ppid(pck_leaf_pem: str) -> bytes:
    # One PCK certificate per platform, presented by every CVM on it: parse it once. Only
    # asked after dcap-qvl verified the chain of this very quote (a failure is not cached).
    return pck_ppid(pck_leaf_pem)


def policy_json(policy: Policy) -> str:
    return msgspec.json.encode(policy).decode()


def policy_from_json(text: str) -> Policy:
    return msgspec.json.decode(text, type=Policy)


def check_attestation(
    att: Attestation,
    collateral: Collateral,
    *,
    policy: Policy,
    now: int,
    root_ca_der: bytes | None,
    vm_config: str = "",
    spki: bytes | None = None,
    raw: bytes | None = None,
) -> Evidence:
    """Verify quote + logs (+ key binding when `spki` is given) and build the BootInfo.
    `raw`: the attestation's encoding as presented (else it is encoded from `att`)."""
    raw = encode_attestation(att) if raw is None else raw
    verdict = verify_quote(att.quote, collateral, policy, now, root_ca_der, event_log=att.event_log)
    reasons = list(verdict.reasons)
    quote = verdict.quote
    if quote is None:
        return Evidence(tuple(reasons), None, raw, att.quote)
    if spki is not None:
        reasons = binding_reasons(spki, att, quote) + reasons
    if replay_runtime_events(att.runtime_events) != quote.report.rtmr3:
        reasons.append("runtime events do not replay to the quote's RTMR3")
    ppid = b""
    if verdict.ok and quote.pck_chain_pem:
        try:
            ppid = _ppid(quote.pck_chain_pem[0])
        except RaTlsError as e:
            reasons.append(str(e))
    try:
        info = decode_app_info(
            measurements_of(quote.report),
            att.runtime_events,
            config=vm_config or att.config,
            ppid=ppid,
        )
    except EventLogError as e:
        return Evidence(tuple([*reasons, f"app info: {e}"]), None, raw, att.quote)
    boot = boot_info(
        tcb_status=verdict.tcb_status or "",
        advisory_ids=verdict.advisory_ids,
        app_id=info.app_id,
        compose_hash=info.compose_hash,
        instance_id=info.instance_id,
        device_id=info.device_id,
        mr_system=info.mr_system,
        mr_aggregated=info.mr_aggregated,
        os_image_hash=info.os_image_hash,
    )
    return Evidence(tuple(reasons), boot, raw, att.quote, info)


class Presented(msgspec.Struct, frozen=True, kw_only=True):
    """What a request presented, decoded but not verified yet."""

    reasons: tuple[str, ...] = ()  # why it could not be decoded (then nothing is verified)
    attestation: Attestation | None = None
    raw: bytes = b""  # SCALE V0 attestation as presented
    spki: bytes = b""  # the public key the quote's report_data must bind
    issued_at: int | None = None  # the RA-TLS certificate's notBefore; None for a CSR

    @property
    def quote(self) -> bytes:
        return self.attestation.quote if self.attestation is not None else b""

    def claimed(self, event: str) -> str:
        """Hex payload of a runtime event (app-id, instance-id) as claimed, unverified."""
        att = self.attestation
        found = find_event_payload(att.runtime_events, event) if att is not None else None
        return found.hex() if found is not None else ""


def present_certificate(der: bytes) -> Presented:
    """Decode an RA-TLS client certificate (TLS already proved the client holds its key)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        att, raw = extract_attestation_raw(cert)
    except (ValueError, RaTlsError) as e:
        return Presented(reasons=(f"client certificate: {e}",))
    issued = int(cert.not_valid_before_utc.timestamp())
    return Presented(attestation=att, raw=raw, spki=spki, issued_at=issued)


def present_csr(raw: bytes, spki: bytes) -> Presented:
    """Decode a SignCert request's attestation, which must bind the CSR's public key."""
    try:
        att = decode_attestation(raw)
    except AttestationDecodeError as e:
        return Presented(reasons=(f"csr attestation: {e}",), raw=raw)
    return Presented(attestation=att, raw=raw, spki=spki)


def verify_presented(
    p: Presented,
    collateral: Collateral | None,
    *,
    policy: Policy,
    now: int,
    root_ca_der: bytes | None,
    max_age: int,
    vm_config: str = "",
) -> Evidence:
    """Check decoded evidence: quote, logs, key binding and (certificates) freshness.
    `collateral` may be None only when nothing was decoded (`p.reasons` says why)."""
    if p.attestation is None or collateral is None:
        return Evidence(p.reasons or ("no attestation presented",), None, p.raw, b"")
    ev = check_attestation(
        p.attestation,
        collateral,
        policy=policy,
        now=now,
        root_ca_der=root_ca_der,
        vm_config=vm_config,
        spki=p.spki,
        raw=p.raw,
    )
    if p.issued_at is None:
        return ev
    fresh: list[str] = []
    if now - p.issued_at > max_age:
        fresh.append(
            f"stale RA-TLS evidence: certificate issued {now - p.issued_at}s ago, max age "
            f"{max_age}s (replayed quote?)"
        )
    elif p.issued_at - now > 300:
        fresh.append(f"RA-TLS certificate issued {p.issued_at - now}s in the future")
    return msgspec.structs.replace(ev, reasons=(*fresh, *ev.reasons)) if fresh else ev


async def check_certificate(
    der: bytes,
    collateral: CollateralSource,
    *,
    policy: Policy,
    now: int,
    root_ca_der: bytes | None,
    max_age: int,
    vm_config: str = "",
) -> Evidence:
    """Decode and check an RA-TLS client certificate in one go."""
    p = present_certificate(der)
    coll = await collateral(p.quote) if p.attestation is not None else None
    return verify_presented(
        p, coll, policy=policy, now=now, root_ca_der=root_ca_der, max_age=max_age,
        vm_config=vm_config,
    )  # fmt: skip


def make_recheck(
    collateral: Callable[[bytes], Collateral], root_ca_der: bytes | None
) -> Callable[[bytes, str, str, int], tuple[list[str], BootInfo | None, str]]:
    """The auditor's `Recheck` for `pydstack.core.kms.audit_kms_log`."""

    def recheck(
        raw: bytes, vm_config: str, policy: str, at: int
    ) -> tuple[list[str], BootInfo | None, str]:
        try:
            att = decode_attestation(raw)
        except AttestationDecodeError as e:
            return [f"attestation: {e}"], None, ""
        ev = check_attestation(
            att,
            collateral(att.quote),
            policy=policy_from_json(policy),
            now=at,
            root_ca_der=root_ca_der,
            vm_config=vm_config,
        )
        return list(ev.reasons), ev.boot, quote_hash(att.quote)

    return recheck


def attestation_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest() if raw else ""
