"""Certificates built the way dstack v0.5.11's guest builds them (bytes and shapes from its
source, `git show v0.5.11:<path>` in the dstack mirror).

- `ra-tls/src/cert.rs` `generate_ra_cert` (dstack-util's KMS client certificate for
  GetAppKey): a P-256 key, subject "RA-TLS TEMP Cert", signed by the KMS temp CA, key usage
  digitalSignature only (no EKU), the attestation under OID 1.8 as
  `VersionedAttestation::into_stripped().to_bytes()`, rcgen's default notBefore
  (1975-01-01) and notAfter now + 10 years (`CertRequest::into_cert_params`; rcgen's own
  default, 4096-01-01, when no notAfter is set).
- `dstack-attest` `into_stripped`: only IMR 3 events, a runtime event without its digest,
  any other without its payload (`cc-eventlog/src/tdx.rs` `stripped`).
"""

from __future__ import annotations

import calendar
import time

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.adapters.tdx.attestation import Attestation
from pydstack.adapters.tdx.ratls import build_ratls_cert

RCGEN_NOT_BEFORE = calendar.timegm((1975, 1, 1, 0, 0, 0))  # rcgen's date_time_ymd(1975, 1, 1)
RCGEN_NOT_AFTER = calendar.timegm((4096, 1, 1, 0, 0, 0))  # rcgen's date_time_ymd(4096, 1, 1)
TEN_YEARS = 86400 * 365 * 10  # ra-tls's default notAfter: now + 10 * 365 days


def stripped(att: Attestation) -> Attestation:
    """`VersionedAttestation::into_stripped` of `att`."""
    log = tuple(
        msgspec.structs.replace(e, digest=b"")
        if e.is_runtime
        else msgspec.structs.replace(e, event_payload=b"")
        for e in att.event_log
        if e.imr == 3
    )
    return msgspec.structs.replace(att, event_log=log)


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def generate_ra_cert(
    temp: dict[str, str],
    att: Attestation,
    key: ec.EllipticCurvePrivateKey,
    *,
    not_after: int | None = None,
) -> tuple[str, str]:
    """(certificate PEM, key PEM) as v0.5.11's `generate_ra_cert(temp_ca_cert, temp_ca_key)` makes
    them; `att` must already bind `key` (its log is stripped here, as ra-tls does)."""
    ca = x509.load_pem_x509_certificate(temp["temp_ca_cert"].encode())
    ca_key = serialization.load_pem_private_key(temp["temp_ca_key"].encode(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    cert = build_ratls_cert(
        key, stripped(att), subject="RA-TLS TEMP Cert", issuer=(ca, ca_key),
        not_before=RCGEN_NOT_BEFORE,
        not_after=int(time.time()) + TEN_YEARS if not_after is None else not_after,
    )  # fmt: skip
    # dstack-util hands RaClient the leaf alone (`tls_client_cert(cert_pair.cert_pem)`)
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem(key)
