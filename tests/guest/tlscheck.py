"""What a GetTlsKey answer must be, whoever signed it: checks shared by the SDK tests."""

from __future__ import annotations

import datetime as dt
import ipaddress
import itertools
import warnings
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pydstack.adapters.tdx.ratls import (
    OID_APP_INFO,
    OID_ATTESTATION,
    RCGEN_NOT_AFTER,
    RCGEN_NOT_BEFORE,
    special_usage,
)


@dataclass(frozen=True)
class TlsOptions:
    """One GetTlsKey request, as the SDKs send it (their defaults: server auth only)."""

    subject: str = ""
    alt_names: tuple[str, ...] = ()
    usage_ra_tls: bool = False
    usage_server_auth: bool = True
    usage_client_auth: bool = False
    with_app_info: bool = False
    not_before: int | None = None
    not_after: int | None = None


def check_tls_key(key_pem: str, chain: list[str], o: TlsOptions, *, chain_len: int) -> None:
    """The key is P-256 PKCS#8, the leaf is for it and is issued by the next certificate,
    and the leaf says what was asked: CN, typed SANs, EKUs, evidence, validity."""
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert "BEGIN PRIVATE KEY" in key_pem  # PKCS#8, as rcgen's serialize_pem
    assert len(chain) == chain_len
    certs = [x509.load_pem_x509_certificate(p.encode()) for p in chain]
    leaf = certs[0]
    assert leaf.public_key() == key.public_key()
    for child, parent in itertools.pairwise(certs):
        child.verify_directly_issued_by(parent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an empty or long CN, as dstack allows
        cn = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    assert cn == [o.subject]
    assert special_usage(leaf) == "app:custom"
    want_san = [
        ipaddress.ip_address(n) if _is_ip(n) else n for n in o.alt_names
    ]  # IPs as IP SANs, the rest as DNS names
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        got_san = [*san.get_values_for_type(x509.DNSName), *san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        got_san = []
    assert sorted(map(str, got_san)) == sorted(map(str, want_san))
    want_eku = {ExtendedKeyUsageOID.SERVER_AUTH} if o.usage_server_auth else set()
    want_eku |= {ExtendedKeyUsageOID.CLIENT_AUTH} if o.usage_client_auth else set()
    try:
        got_eku = set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        got_eku = set()
    assert got_eku == want_eku
    oids = {e.oid for e in leaf.extensions}
    assert (OID_ATTESTATION in oids) == o.usage_ra_tls
    assert (OID_APP_INFO in oids) == o.with_app_info
    # as asked, else rcgen's defaults as dstack's certificates carry (1975-01-01..4096-01-01)
    before = RCGEN_NOT_BEFORE if o.not_before is None else o.not_before
    after = RCGEN_NOT_AFTER if o.not_after is None else o.not_after
    assert leaf.not_valid_before_utc == dt.datetime.fromtimestamp(before, dt.UTC)
    assert leaf.not_valid_after_utc == dt.datetime.fromtimestamp(after, dt.UTC)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def option_matrix(now: int) -> list[TlsOptions]:
    """The SDKs' defaults, then every combination of the boolean options, then the names and
    the validity window (dstack OS >= 0.5.7)."""
    out = [TlsOptions()]
    for bits in range(16):
        ra, server, client, info = (bool(bits >> i & 1) for i in range(4))
        out.append(
            TlsOptions(subject="app.example", usage_ra_tls=ra, usage_server_auth=server,
                       usage_client_auth=client, with_app_info=info)
        )  # fmt: skip
    out.append(TlsOptions(subject="x" * 100, alt_names=("203.0.113.10", "::1", "web.example")))
    out.append(TlsOptions(alt_names=("10.0.0.1",), not_before=now - 60, not_after=now + 3600))
    return out
