"""Check the evidence a key request carries and turn it into dstack's BootInfo.

Evidence is an RA-TLS client certificate (GetAppKey, GetKmsKey) or a CSR's public key plus
attestation (SignCert). Checks, each with its own reason: the quote verifies under the policy
(dcap-qvl chain, TCB status, advisories, debug), the event log replays to the quote's RTMRs,
the runtime events replay to RTMR3, the quote's report_data binds the presented public key
(`sha512("ratls-cert:" || SPKI)`), and, only when `max_age` is given, the certificate's
notBefore is recent (a client-chosen date: see docs/threat-model.md, "RA-TLS freshness").

The reasons come in two kinds. `Evidence.unverified`: it is not authentic evidence of this
client's current boot (undecodable or oversized, the quote's signature chain fails, it is not
bound to the TLS key, it is stale, the logs do not replay): anyone can send that, so the KMS
refuses it with a metric and a log line and puts nothing on the log. The other reasons are the
policy's verdict on authentic evidence (debug TD, TCB status, advisories, measurements): that
refusal is a decision on the log like a backend's.

Two steps: `present_certificate` / `present_csr` decode what the client presented (cheap, and
bounded: an attestation over `MAX_ATTESTATION` bytes is refused undecoded), then
`verify_presented` checks it (dcap-qvl and the replays: the CPU-heavy part).

    p = present_certificate(der)
    ev = verify_presented(p, await collateral(p.quote), policy=pol, now=now, root_ca_der=dev_root,
                          max_age=None, vm_config=cfg)
    ev.unverified, ev.kind, ev.reasons, ev.boot
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
    AttestationTooLarge,
    RaTlsError,
    binding_reasons,
    extract_attestation_raw,
    pck_ppid,
)
from pydstack.adapters.tdx.ratls_log import log_for_replay, stripped_log_reasons
from pydstack.adapters.tdx.verify import Policy, policy_reasons, verify_quote
from pydstack.core.kms import BootInfo, boot_info, quote_hash

CollateralSource = Callable[[bytes], Awaitable[Collateral]]

# What a KeyRequested may store, so one event stays bounded (see docs/architecture.md, KMS).
# A dstack attestation (quote ~5 KB with its PCK chain, event log, runtime events, sys config)
# is ~10-60 KB; a dstack vm_config is a JSON object of a few hundred bytes.
MAX_ATTESTATION = 256 * 1024
MAX_VM_CONFIG = 16 * 1024
MAX_CERTIFICATE = MAX_ATTESTATION + 16 * 1024  # + a certificate's (CSR's) keys, names, dates

# Kinds of unverified evidence (the `reason` label of pydstack_kms_refused_total), gravest
# first: an evidence's `kind` is the first of these its reasons show.
MALFORMED = "malformed"  # not decodable: no certificate / attestation / quote structure
OVERSIZE = "oversize"  # over MAX_ATTESTATION / MAX_VM_CONFIG, refused undecoded
QUOTE = "quote"  # dcap-qvl refuses the quote (signature, PCK chain, collateral dates)
BINDING = "binding"  # the quote's report_data does not bind the presented key
STALE = "stale"  # the RA-TLS certificate is older than max_age (or from the future)
EVENT_LOG = "event_log"  # the event log or runtime events do not replay to the RTMRs
_GRAVITY = (MALFORMED, OVERSIZE, QUOTE, BINDING, STALE, EVENT_LOG)


class Evidence(msgspec.Struct, frozen=True):
    reasons: tuple[str, ...]  # every reason to refuse; empty: the evidence holds
    boot: BootInfo | None
    attestation: bytes  # SCALE V0 (what KeyRequested records)
    quote: bytes
    app_info: AppInfo | None = None
    # The reasons (a subset of `reasons`) that make it no authentic evidence of this client's
    # boot, and the kind of the gravest; empty when it verified and only the policy's reasons
    # (debug TD, TCB status, advisories, measurements) may remain.
    unverified: tuple[str, ...] = ()
    kind: str = ""

    @property
    def verified(self) -> bool:
        return not self.unverified


def _unverified(reasons: list[str], raw: bytes, quote: bytes, kind: str) -> Evidence:
    return Evidence(tuple(reasons), None, raw, quote, unverified=tuple(reasons), kind=kind)


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
    # dstack v0.5.11's certificates carry a stripped log (RTMR3 events only): RTMR3 alone then
    log = log_for_replay(att.event_log)
    verdict = verify_quote(att.quote, collateral, policy, now, root_ca_der, event_log=log)
    quote = verdict.quote
    if quote is None:
        return _unverified(verdict.reasons, raw, att.quote, MALFORMED)
    # verify_quote lists dcap-qvl's refusal first (tcb_status then stays None), then the
    # policy's reasons, then the event log's: told apart by source, not by their text.
    bad_sig = verdict.reasons[:1] if verdict.tcb_status is None else []
    by_policy = set(policy_reasons(quote, policy, verdict.tcb_status, verdict.advisory_ids))
    bad_log = [r for r in verdict.reasons[len(bad_sig) :] if r not in by_policy]
    bad_binding = binding_reasons(spki, att, quote) if spki is not None else []
    reasons = bad_binding + verdict.reasons
    stripped = stripped_log_reasons(att.event_log, quote.report.rtmr3)
    bad_log += stripped
    reasons += stripped
    if replay_runtime_events(att.runtime_events) != quote.report.rtmr3:
        bad_log.append("runtime events do not replay to the quote's RTMR3")
        reasons.append(bad_log[-1])
    ppid = b""
    if verdict.ok and quote.pck_chain_pem:
        try:
            ppid = _ppid(quote.pck_chain_pem[0])
        except RaTlsError as e:
            bad_sig.append(str(e))
            reasons.append(str(e))
    kinds = ((QUOTE, bad_sig), (BINDING, bad_binding), (EVENT_LOG, bad_log))
    kind = next((k for k, found in kinds if found), "")  # in _GRAVITY's order
    unverified = tuple(r for _, found in kinds for r in found)
    try:
        info = decode_app_info(
            measurements_of(quote.report),
            att.runtime_events,
            config=vm_config or att.config,
            ppid=ppid,
        )
    except EventLogError as e:
        return Evidence(
            (*reasons, f"app info: {e}"), None, raw, att.quote, unverified=unverified, kind=kind
        )
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
    return Evidence(tuple(reasons), boot, raw, att.quote, info, unverified, kind)


class Presented(msgspec.Struct, frozen=True, kw_only=True):
    """What a request presented, decoded but not verified yet."""

    reasons: tuple[str, ...] = ()  # why it could not be decoded (then nothing is verified)
    kind: str = ""  # MALFORMED or OVERSIZE when it could not be decoded
    attestation: Attestation | None = None
    raw: bytes = b""  # SCALE V0 attestation as presented
    spki: bytes = b""  # the public key the quote's report_data must bind
    issued_at: int | None = None  # the RA-TLS certificate's notBefore; None for a CSR

    @property
    def quote(self) -> bytes:
        return self.attestation.quote if self.attestation is not None else b""

    def claimed(self, event: str) -> str:
        """Hex payload of a runtime event (app-id, instance-id) as the attestation states it:
        verified only once `verify_presented` found the runtime events replay to RTMR3."""
        att = self.attestation
        found = find_event_payload(att.runtime_events, event) if att is not None else None
        return found.hex() if found is not None else ""


def present_certificate(der: bytes) -> Presented:
    """Decode an RA-TLS client certificate (TLS already proved the client holds its key);
    one whose attestation is over MAX_ATTESTATION bytes is refused before it is decoded."""
    if len(der) > MAX_CERTIFICATE:
        why = f"client certificate is {len(der)} bytes, over {MAX_CERTIFICATE}"
        return Presented(reasons=(why,), kind=OVERSIZE)
    try:
        cert = x509.load_der_x509_certificate(der)
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        att, raw = extract_attestation_raw(cert, MAX_ATTESTATION)
    except AttestationTooLarge as e:
        return Presented(reasons=(f"client certificate: {e}",), kind=OVERSIZE)
    except (ValueError, RaTlsError) as e:
        return Presented(reasons=(f"client certificate: {e}",), kind=MALFORMED)
    issued = int(cert.not_valid_before_utc.timestamp())
    return Presented(attestation=att, raw=raw, spki=spki, issued_at=issued)


def present_csr(raw: bytes, spki: bytes) -> Presented:
    """Decode a SignCert request's attestation, which must bind the CSR's public key."""
    if len(raw) > MAX_ATTESTATION:
        why = f"csr attestation is {len(raw)} bytes, over {MAX_ATTESTATION}"
        return Presented(reasons=(why,), kind=OVERSIZE)
    try:
        att = decode_attestation(raw)
    except AttestationDecodeError as e:
        return Presented(reasons=(f"csr attestation: {e}",), kind=MALFORMED)
    return Presented(attestation=att, raw=raw, spki=spki)


def verify_presented(
    p: Presented,
    collateral: Collateral | None,
    *,
    policy: Policy,
    now: int,
    root_ca_der: bytes | None,
    max_age: int | None,
    vm_config: str = "",
) -> Evidence:
    """Check decoded evidence: quote, logs, key binding and (certificates, with `max_age`)
    the notBefore window. `collateral` may be None only when nothing was decoded
    (`p.reasons` says why)."""
    if p.attestation is None or collateral is None:
        why = list(p.reasons or ("no attestation presented",))
        return _unverified(why, p.raw, b"", p.kind or MALFORMED)
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
    if p.issued_at is None or max_age is None:
        return ev
    fresh: list[str] = []
    if now - p.issued_at > max_age:
        fresh.append(
            f"stale RA-TLS evidence: certificate issued {now - p.issued_at}s ago, max age "
            f"{max_age}s (replayed quote?)"
        )
    elif p.issued_at - now > 300:
        fresh.append(f"RA-TLS certificate issued {p.issued_at - now}s in the future")
    if not fresh:
        return ev
    kind = min(ev.kind or STALE, STALE, key=_GRAVITY.index)
    return msgspec.structs.replace(
        ev, reasons=(*fresh, *ev.reasons), unverified=(*fresh, *ev.unverified), kind=kind
    )


async def check_certificate(
    der: bytes,
    collateral: CollateralSource,
    *,
    policy: Policy,
    now: int,
    root_ca_der: bytes | None,
    max_age: int | None,
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
