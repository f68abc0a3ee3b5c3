"""Check the evidence a key request carries and turn it into dstack's BootInfo.

Evidence is an RA-TLS client certificate (GetAppKey, GetKmsKey) or a CSR's public key plus
attestation (SignCert). Checks, each with its own reason: the quote verifies under the policy
(dcap-qvl chain, TCB status, advisories, debug), the event log replays to the quote's RTMRs,
the runtime events replay to RTMR3, the quote's report_data binds the presented public key
(`sha512("ratls-cert:" || SPKI)`), and the certificate is fresh (issued within `max_age`).

    ev = check_certificate(der, collateral, policy=p, now=now, root_ca_der=dev_root, ...)
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
from pydstack.adapters.tdx.identity import AppInfo, decode_app_info, measurements_of
from pydstack.adapters.tdx.ratls import RaTlsError, binding_reasons, extract_attestation, pck_ppid
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
) -> Evidence:
    """Verify quote + logs (+ key binding when `spki` is given) and build the BootInfo."""
    raw = encode_attestation(att)
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
    """Check an RA-TLS client certificate (TLS already proved the client holds its key)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        att = extract_attestation(cert)
    except (ValueError, RaTlsError) as e:
        return Evidence((f"client certificate: {e}",), None, b"", b"")
    ev = check_attestation(
        att,
        await collateral(att.quote),
        policy=policy,
        now=now,
        root_ca_der=root_ca_der,
        vm_config=vm_config,
        spki=spki,
    )
    issued = int(cert.not_valid_before_utc.timestamp())
    fresh: list[str] = []
    if now - issued > max_age:
        fresh.append(
            f"stale RA-TLS evidence: certificate issued {now - issued}s ago, max age {max_age}s"
            " (replayed quote?)"
        )
    elif issued - now > 300:
        fresh.append(f"RA-TLS certificate issued {issued - now}s in the future")
    return msgspec.structs.replace(ev, reasons=(*fresh, *ev.reasons)) if fresh else ev


async def check_csr_attestation(
    raw: bytes,
    spki: bytes,
    collateral: CollateralSource,
    *,
    policy: Policy,
    now: int,
    root_ca_der: bytes | None,
    vm_config: str = "",
) -> Evidence:
    """Check a SignCert request's attestation, which must bind the CSR's public key."""
    try:
        att = decode_attestation(raw)
    except AttestationDecodeError as e:
        return Evidence((f"csr attestation: {e}",), None, raw, b"")
    return check_attestation(
        att,
        await collateral(att.quote),
        policy=policy,
        now=now,
        root_ca_der=root_ca_der,
        vm_config=vm_config,
        spki=spki,
    )


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
