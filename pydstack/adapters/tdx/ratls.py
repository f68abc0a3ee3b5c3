"""RA-TLS: X.509 certificates that carry a TDX attestation bound to their own key.

dstack's encoding (ra-tls `cert.rs`, `oids.rs`): each extension value is a DER OCTET STRING
around the content; the attestation lives under 1.3.6.1.4.1.62397.1.8 as a SCALE V0
`VersionedAttestation` (see `attestation.py`); older certificates carry the raw quote (1.1)
and the JSON event log (1.2) instead, which we read too. The quote's report_data is
`sha512("ratls-cert:" || SubjectPublicKeyInfo DER)`, so evidence copied into a certificate
for another key is refused.

    cert = build_ratls_cert(key, attestation, subject="app.local", usage_server_auth=True)
    result = check_ratls_cert(der, collateral, now=now, root_ca_der=dev_root)
    if not result.ok: print(result.reasons)

The TLS side (contexts, aiohttp server middleware and client connector) is in `ratls_tls.py`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import secrets
import warnings
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import dcap_qvl
import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .attestation import Attestation, AttestationDecodeError, decode_attestation, encode_attestation
from .collateral import Collateral
from .errors import CollateralError, TdxError
from .eventlog import (
    EventLogError,
    parse_json_event_log,
    replay_runtime_events,
    runtime_events_of,
)
from .identity import AppInfo, decode_app_info, measurements_of
from .quote import Quote
from .ratls_appinfo import AppInfoDecodeError, decode_app_info_ext, encode_app_info
from .ratls_log import log_for_replay, stripped_log_reasons
from .verify import Policy, verify_quote

OID_TDX_QUOTE = x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.1")
OID_EVENT_LOG = x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.2")
OID_APP_ID = x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.3")
OID_CERT_USAGE = x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.4")
OID_ATTESTATION = x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.8")
OID_APP_INFO = x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.9")
RATLS_CERT_TAG = b"ratls-cert"
_ELGZ = b"ELGZv1"  # dstack's marker for a gzip-compressed event-log extension
_MAX_EVENT_LOG_EXT = 1 << 20


class RaTlsError(TdxError):
    """A certificate is not usable RA-TLS evidence; the message says which part failed."""


class AttestationTooLarge(RaTlsError):
    """The attestation a certificate carries is over the caller's bound (nothing decoded)."""


class Attester(Protocol):
    """Anything that can quote: given 64 bytes of report_data, a full attestation."""

    async def attest(self, report_data: bytes) -> Attestation: ...


CollateralSource = Callable[[bytes], Awaitable[Collateral]]


def report_data_for(tag: bytes, content: bytes) -> bytes:
    """dstack `QuoteContentType::to_report_data`: `sha512(tag || ":" || content)`."""
    return hashlib.sha512(tag + b":" + content).digest()


def spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ratls_report_data(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The report_data that binds a quote to this certificate key."""
    return report_data_for(RATLS_CERT_TAG, spki_der(public_key))


def _octet_string(content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return b"\x04" + length + content


def _unwrap_octet_string(der: bytes, what: str) -> bytes:
    if len(der) < 2 or der[0] != 0x04:
        raise RaTlsError(f"{what} extension is not a DER OCTET STRING")
    n, pos = der[1], 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 4 or len(der) < 2 + k:
            raise RaTlsError(f"{what} extension has a bad DER length")
        n, pos = int.from_bytes(der[2 : 2 + k], "big"), 2 + k
    if pos + n != len(der):
        raise RaTlsError(f"{what} extension length does not match its content")
    return der[pos:]


def _ext(oid: x509.ObjectIdentifier, content: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(oid, _octet_string(content))


def san_names(alt_names: Sequence[str]) -> list[x509.GeneralName]:
    """dstack (rcgen `CertificateParams::new`): a name that parses as an IP address is an IP
    SAN, any other a DNS name."""
    out: list[x509.GeneralName] = []
    for n in alt_names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


# rcgen's default validity (`CertificateParams::default()`), what dstack's certificates carry
# when the request names none (GetTlsKey's and SignCert's not_before / not_after unset)
RCGEN_NOT_BEFORE = 157766400  # 1975-01-01T00:00:00Z
RCGEN_NOT_AFTER = 67090118400  # 4096-01-01T00:00:00Z


def build_ratls_cert(
    key: ec.EllipticCurvePrivateKey,
    attestation: Attestation | None,
    *,
    subject: str,
    alt_names: Sequence[str] = (),
    org_name: str | None = None,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    usage_server_auth: bool = False,
    usage_client_auth: bool = False,
    special_usage: str | None = None,
    app_id: bytes | None = None,
    app_info: AppInfo | None = None,
    legacy_extensions: bool = False,
    not_before: int,
    not_after: int,
    ca_path_len: int | None = None,
) -> x509.Certificate:
    """A certificate for `key`, signed by `issuer` (self-signed without one).

    `attestation` must already be bound to `key` (see `ratls_report_data`); it goes under
    OID 1.8, plus 1.1/1.2 when `legacy_extensions` is set for pre-1.8 dstack verifiers.
    """
    # dstack (rcgen) takes any subject, the empty one of the SDKs' defaults included, as the
    # CN; cryptography's 1..64-character check for CN would turn those into an HTTP 500.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # what _validate=False says instead
        names = [x509.NameAttribute(NameOID.COMMON_NAME, subject, _validate=False)]
    if org_name:
        names.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org_name))
    name = x509.Name(names)
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(dt.datetime.fromtimestamp(not_before, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(not_after, dt.UTC))
    )
    is_ca = ca_path_len is not None
    b = b.add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=is_ca,
            crl_sign=is_ca,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    if is_ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=ca_path_len), critical=True)
    ekus = [ExtendedKeyUsageOID.SERVER_AUTH] if usage_server_auth else []
    ekus += [ExtendedKeyUsageOID.CLIENT_AUTH] if usage_client_auth else []
    if ekus:
        b = b.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
    if alt_names:
        b = b.add_extension(x509.SubjectAlternativeName(san_names(alt_names)), critical=False)
    if app_id is not None:
        b = b.add_extension(_ext(OID_APP_ID, app_id), critical=False)
    if app_info is not None:
        b = b.add_extension(_ext(OID_APP_INFO, encode_app_info(app_info)), critical=False)
    if special_usage is not None:
        b = b.add_extension(_ext(OID_CERT_USAGE, special_usage.encode()), critical=False)
    if attestation is not None:
        b = b.add_extension(_ext(OID_ATTESTATION, encode_attestation(attestation)), critical=False)
        if legacy_extensions:
            from .eventlog import dump_json_event_log

            log = dump_json_event_log(attestation.event_log).encode()
            b = b.add_extension(_ext(OID_TDX_QUOTE, attestation.quote), critical=False)
            b = b.add_extension(_ext(OID_EVENT_LOG, log), critical=False)
    return b.sign(signer, hashes.SHA256())


async def issue_ratls_cert(
    attester: Attester,
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    subject: str = "RA-TLS Cert",
    not_before: int,
    not_after: int,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    usage_server_auth: bool = True,
    usage_client_auth: bool = True,
    alt_names: Sequence[str] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Generate (or take) a P-256 key, quote its binding, return the key and certificate."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    att = await attester.attest(ratls_report_data(key.public_key()))
    cert = build_ratls_cert(
        key,
        att,
        subject=subject,
        alt_names=alt_names,
        issuer=issuer,
        usage_server_auth=usage_server_auth,
        usage_client_auth=usage_client_auth,
        not_before=not_before,
        not_after=not_after,
    )
    return key, cert


def _ext_bytes(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise RaTlsError(f"extension {oid.dotted_string} has an unexpected type")
    return _unwrap_octet_string(value.value, oid.dotted_string)


def extract_attestation(cert: x509.Certificate) -> Attestation:
    """The attestation a certificate carries (1.8, else legacy 1.1 + 1.2)."""
    raw = _ext_bytes(cert, OID_ATTESTATION)
    return _decode_extension(raw) if raw is not None else _legacy_attestation(cert)


def special_usage(cert: x509.Certificate) -> str | None:
    """The dstack special usage a certificate names (1.3.6.1.4.1.62397.1.4, e.g. `kms:rpc`,
    `app:ca`), or None when it names none."""
    raw = _ext_bytes(cert, OID_CERT_USAGE)
    return raw.decode("utf-8", "replace") if raw is not None else None


def app_id_of(cert: x509.Certificate) -> bytes | None:
    """The app id a certificate names (1.3.6.1.4.1.62397.1.3: an app CA, an app's SignCert
    certificate), or None when it names none."""
    return _ext_bytes(cert, OID_APP_ID)


def app_info_of(cert: x509.Certificate) -> AppInfo | None:
    """The AppInfo a certificate's 1.9 extension states (dstack's KMS writes it into a
    SignCert certificate asked with `ext_app_info`), or None without one. Only the issuer
    vouches for it: trust it from a chain to a KMS root only."""
    raw = _ext_bytes(cert, OID_APP_INFO)
    if raw is None:
        return None
    try:
        return decode_app_info_ext(raw)
    except AppInfoDecodeError as e:
        raise RaTlsError(str(e)) from None


def has_attestation(cert: x509.Certificate) -> bool:
    """Whether the certificate carries RA-TLS evidence (1.8, or the legacy 1.1 quote)."""
    oids = {e.oid for e in cert.extensions}
    return OID_ATTESTATION in oids or OID_TDX_QUOTE in oids


def extract_attestation_raw(
    cert: x509.Certificate, max_len: int | None = None
) -> tuple[Attestation, bytes]:
    """The attestation a certificate carries and its SCALE V0 encoding: the 1.8 extension's
    bytes as presented (not re-encoded), or the legacy 1.1 + 1.2 pair encoded.

    With `max_len`, an attestation over that many bytes raises `AttestationTooLarge` before
    any of it is decoded (legacy: quote plus event log, decompressed at most that far)."""
    raw = _ext_bytes(cert, OID_ATTESTATION)
    if raw is not None:
        if max_len is not None and len(raw) > max_len:
            raise AttestationTooLarge(f"attestation is {len(raw)} bytes, over {max_len}")
        return _decode_extension(raw), raw
    att = _legacy_attestation(cert, max_len)
    raw = encode_attestation(att)
    if max_len is not None and len(raw) > max_len:
        raise AttestationTooLarge(f"attestation is {len(raw)} bytes, over {max_len}")
    return att, raw


def _decode_extension(raw: bytes) -> Attestation:
    try:
        return decode_attestation(raw)
    except AttestationDecodeError as e:
        raise RaTlsError(f"attestation extension: {e}") from None


def _legacy_attestation(cert: x509.Certificate, max_len: int | None = None) -> Attestation:
    quote = _ext_bytes(cert, OID_TDX_QUOTE)
    if quote is None:
        raise RaTlsError("certificate has no RA-TLS attestation extension")
    log = _ext_bytes(cert, OID_EVENT_LOG)
    if log is None:
        raise RaTlsError("certificate has a TDX quote but no event log extension")
    limit = _MAX_EVENT_LOG_EXT if max_len is None else min(_MAX_EVENT_LOG_EXT, max_len)
    if log.startswith(_ELGZ):
        log = _gunzip(log[len(_ELGZ) :], limit)
    if max_len is not None and len(quote) + len(log) > max_len:
        raise AttestationTooLarge(
            f"quote and event log are {len(quote) + len(log)} bytes, over {max_len}"
        )
    try:
        events = parse_json_event_log(log)
    except EventLogError as e:
        raise RaTlsError(f"event log extension: {e}") from None
    # Legacy certificates carry no separate report_data: dstack takes the quote's own.
    report_data = quote[568:632] if len(quote) >= 632 else bytes(64)
    return Attestation(
        quote=quote,
        event_log=tuple(events),
        runtime_events=tuple(runtime_events_of(events)),
        report_data=report_data,
    )


def _gunzip(data: bytes, limit: int) -> bytes:
    """One gzip member, decompressed at most `limit` bytes far (no decompression bomb)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise RaTlsError(f"event log extension does not decompress: {e}") from None
    if len(out) > limit:
        raise AttestationTooLarge(f"event log extension decompresses to over {limit} bytes")
    if not d.eof:
        raise RaTlsError("event log extension does not decompress: truncated gzip stream")
    return out


def pck_ppid(pck_leaf_pem: str) -> bytes:
    """PPID from a PCK certificate's SGX extension (dstack's device_id is its sha256).

    Only meaningful once dcap-qvl has verified the chain, so callers ask after a good verdict.
    """
    try:
        return bytes(dcap_qvl.parse_pck_extension_from_pem(pck_leaf_pem.encode()).ppid)
    except ValueError as e:
        raise RaTlsError(f"PCK certificate SGX extension: {e}") from None


class RaTlsResult(msgspec.Struct, frozen=True):
    """Outcome of checking one RA-TLS certificate; `ok` exactly when `reasons` is empty."""

    ok: bool
    reasons: tuple[str, ...]
    public_key_der: bytes
    tcb_status: str | None = None
    quote: Quote | None = None
    attestation: Attestation | None = None
    app_info: AppInfo | None = None


def binding_reasons(spki: bytes, att: Attestation, quote: Quote) -> list[str]:
    """Why the attestation does not bind this certificate key (empty when it does)."""
    want = report_data_for(RATLS_CERT_TAG, spki)
    out: list[str] = []
    if quote.report.report_data != want:
        out.append(
            "quote report_data does not bind the certificate key: want sha512('ratls-cert:'"
            f" || spki) = {want.hex()[:32]}..., quote has {quote.report.report_data.hex()[:32]}..."
        )
    if att.report_data != quote.report.report_data:
        out.append("attestation report_data differs from the quote's")
    return out


def check_attestation(
    att: Attestation,
    collateral: Collateral,
    *,
    now: int,
    policy: Policy | None = None,
    root_ca_der: bytes | None = None,
) -> tuple[list[str], str | None, Quote | None, AppInfo | None]:
    """Verify quote + event log of `att`: (reasons, tcb_status, quote, app_info)."""
    # verify_quote replays the log (RTMR0-3 and the runtime digest rule) against the quote;
    # dstack's stripped certificate log (RTMR3 events only) is replayed to RTMR3 alone.
    log = log_for_replay(att.event_log)
    verdict = verify_quote(
        att.quote, collateral, policy or Policy(), now, root_ca_der, event_log=log
    )
    reasons = list(verdict.reasons)
    quote = verdict.quote
    if quote is None:
        return reasons, verdict.tcb_status, None, None
    reasons += stripped_log_reasons(att.event_log, quote.report.rtmr3)
    if replay_runtime_events(att.runtime_events) != quote.report.rtmr3:
        reasons.append("runtime_events do not replay to the quote's RTMR3")
    ppid = b""
    if verdict.ok and quote.pck_chain_pem:
        ppid = pck_ppid(quote.pck_chain_pem[0])
    try:
        info = decode_app_info(
            measurements_of(quote.report), att.runtime_events, config=att.config, ppid=ppid
        )
    except EventLogError as e:
        reasons.append(f"app info: {e}")
        info = None
    return reasons, verdict.tcb_status, quote, info


def check_ratls_cert(
    cert_der: bytes,
    collateral: Collateral,
    *,
    now: int,
    policy: Policy | None = None,
    root_ca_der: bytes | None = None,
) -> RaTlsResult:
    """Check a peer certificate: attestation present, bound to its key, quote and log valid.

    Like dstack, this does not check who issued the certificate; TLS does that.
    """
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError) as e:
        return RaTlsResult(False, (f"not an X.509 certificate: {e}",), b"")
    try:
        att = extract_attestation(cert)
    except RaTlsError as e:
        return RaTlsResult(False, (str(e),), spki)
    reasons, status, quote, info = check_attestation(
        att, collateral, now=now, policy=policy, root_ca_der=root_ca_der
    )
    if quote is not None:
        reasons = binding_reasons(spki, att, quote) + reasons
    return RaTlsResult(not reasons, tuple(reasons), spki, status, quote, att, info)


async def collateral_for_cert(cert_der: bytes, source: CollateralSource) -> Collateral:
    """Fetch collateral for the quote inside a certificate (for network collateral sources);
    collateral that cannot be had (a PCCS outage, a quote naming no platform) is a
    `RaTlsError` saying so: the certificate cannot be checked now."""
    try:
        att = extract_attestation(x509.load_der_x509_certificate(cert_der))
    except ValueError as e:
        raise RaTlsError(f"not an X.509 certificate: {e}") from None
    try:
        return await source(att.quote)
    except CollateralError as e:
        raise RaTlsError(
            f"collateral unavailable, the evidence cannot be checked now: {e}"
        ) from None
