"""How the KMS tells evidence that does not verify (refused, nothing on the log) from the
policy's verdict on evidence that did (a decision on the log), and the size bounds."""

from __future__ import annotations

import datetime as dt
import gzip
import time

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pydstack.actors.kms.evidence import (
    BINDING,
    EVENT_LOG,
    MALFORMED,
    MAX_ATTESTATION,
    MAX_CERTIFICATE,
    OVERSIZE,
    QUOTE,
    STALE,
    Evidence,
    present_certificate,
    present_csr,
    verify_presented,
)
from pydstack.actors.kms.refusal import MAX_REASON, refuse
from pydstack.actors.metrics import sample
from pydstack.adapters.tdx.eventlog import dump_json_event_log, runtime_tdx_event
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import (
    OID_ATTESTATION,
    OID_EVENT_LOG,
    OID_TDX_QUOTE,
    AttestationTooLarge,
    extract_attestation_raw,
    ratls_report_data,
)
from pydstack.adapters.tdx.verify import Policy

from .conftest import CollateralBox, client_cert, make_cvm

MR_OWNER_AT = 48 + 232  # quote header + TD report fields before mr_owner


def _octets(content: bytes) -> bytes:
    """DER OCTET STRING around `content` (how RA-TLS extensions wrap their value)."""
    n = len(content)
    if n < 0x80:
        return b"\x04" + bytes([n]) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x04" + bytes([0x80 | len(length)]) + length + content


def cert_with(exts: dict[x509.ObjectIdentifier, bytes]) -> x509.Certificate:
    """A self-signed certificate carrying `exts` as given, decodable or not."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
    )
    for oid, content in exts.items():
        b = b.add_extension(x509.UnrecognizedExtension(oid, _octets(content)), critical=False)
    return b.sign(key, hashes.SHA256())


def der(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def temp() -> dict[str, str]:
    """A temp CA as GetTempCaCert hands it out (PEMs)."""
    from pydstack.actors.kms.service import _self_signed_ca, key_pem, pem

    key = ec.generate_private_key(ec.SECP256R1())
    ca = _self_signed_ca(key, "Dstack Client Temp CA", 0, int(time.time()))
    return {"temp_ca_cert": pem(ca), "temp_ca_key": key_pem(key)}


def check(pki: DevPki, chain_pem: str, *, status: str = "UpToDate") -> Evidence:
    box = CollateralBox(pki)
    box.status = status
    cert = x509.load_pem_x509_certificate(chain_pem.encode())
    p = present_certificate(der(cert))
    coll = box.get() if p.attestation is not None else None
    return verify_presented(p, coll, policy=Policy(), now=int(time.time()),
                            root_ca_der=pki.root_der, max_age=3600)  # fmt: skip


async def test_each_way_evidence_fails_to_verify_has_its_kind(
    pki: DevPki, temp: dict[str, str]
) -> None:
    """A changed quote byte, a quote bound to another key, an old certificate, a rewritten
    runtime event, no attestation: each is unverified, with its kind for the metric."""
    cvm = make_cvm(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    att = await cvm.attest(ratls_report_data(key.public_key()))
    q = bytearray(att.quote)
    q[MR_OWNER_AT] ^= 1
    log = list(att.event_log)
    i = next(i for i, e in enumerate(log) if e.event == "compose-hash")
    log[i] = runtime_tdx_event("compose-hash", b"\x00" * 32)
    other = ec.generate_private_key(ec.SECP256R1())
    cases = {
        QUOTE: client_cert(temp, msgspec.structs.replace(att, quote=bytes(q)), key),
        BINDING: client_cert(temp, att, other),
        STALE: client_cert(temp, att, key, not_before=int(time.time()) - 7200),
        EVENT_LOG: client_cert(temp, msgspec.structs.replace(att, event_log=tuple(log)), key),
        MALFORMED: client_cert(temp, None, key),
    }
    for kind, (chain, _) in cases.items():
        ev = check(pki, chain)
        assert not ev.verified and ev.kind == kind, (kind, ev.kind, ev.reasons)
        assert set(ev.unverified) <= set(ev.reasons)
    ok = check(pki, client_cert(temp, att, key)[0])
    assert ok.verified and ok.reasons == () and ok.kind == ""


async def test_the_policys_refusal_of_verified_evidence_is_not_unverified(
    pki: DevPki, temp: dict[str, str]
) -> None:
    """A genuine quote on an out-of-date platform verified: the TCB status is the policy's
    reason (a KeyDenied on the log), not a reason to keep it off the log."""
    cvm = make_cvm(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    chain, _ = client_cert(temp, await cvm.attest(ratls_report_data(key.public_key())), key)
    ev = check(pki, chain, status="OutOfDate")
    assert ev.verified and ev.reasons == ("tcb status OutOfDate not accepted",)
    assert ev.boot is not None


def test_an_attestation_over_the_bound_is_refused_undecoded() -> None:
    """Garbage over MAX_ATTESTATION is oversize (decoded, it would be malformed); a larger
    certificate is refused before it is parsed; so is a CSR's attestation."""
    p = present_certificate(der(cert_with({OID_ATTESTATION: b"\xff" * (MAX_ATTESTATION + 1)})))
    assert p.attestation is None and p.kind == OVERSIZE, p.reasons
    p = present_certificate(der(cert_with({OID_ATTESTATION: b"\xff" * 100})))
    assert p.kind == MALFORMED
    p = present_certificate(b"\x30" * (MAX_CERTIFICATE + 1))
    assert p.kind == OVERSIZE and "client certificate is" in p.reasons[0]
    assert present_csr(b"\x00" * (MAX_ATTESTATION + 1), b"k").kind == OVERSIZE


async def test_a_gzip_bomb_event_log_is_cut_at_the_bound(pki: DevPki) -> None:
    """A legacy certificate's compressed event log is decompressed at most to the bound: a few
    KiB that would inflate to 64 MiB raise, without inflating them."""
    quote, _ = make_cvm(pki).backend.attest(bytes(64))
    bomb = b"ELGZv1" + gzip.compress(b" " * (64 << 20), compresslevel=9)
    assert len(bomb) < 100_000
    cert = cert_with({OID_TDX_QUOTE: quote, OID_EVENT_LOG: bomb})
    with pytest.raises(AttestationTooLarge, match="decompresses to over"):
        extract_attestation_raw(cert)
    with pytest.raises(AttestationTooLarge, match=f"over {MAX_ATTESTATION}"):
        extract_attestation_raw(cert, MAX_ATTESTATION)
    # A legacy certificate within the bound still reads, compressed or not.
    cvm = make_cvm(pki)
    quote, events = cvm.backend.attest(bytes(64))
    text = dump_json_event_log(events).encode()
    for log in (text, b"ELGZv1" + gzip.compress(text)):
        att, raw = extract_attestation_raw(
            cert_with({OID_TDX_QUOTE: quote, OID_EVENT_LOG: log}), MAX_ATTESTATION
        )
        assert att.quote == quote and len(att.event_log) == len(events) and raw


def test_a_refusal_is_counted_with_a_known_kind_and_a_clipped_reason() -> None:
    """The metric's label is never client text; the reason (which may quote the client) is
    clipped before it is logged or answered."""
    before = sample("pydstack_kms_refused_total", {"reason": "other"})
    r = refuse("GetAppKey", "client-chosen text", "x" * 5000)
    assert r.kind == "other" and r.status == 403
    assert len(r.reason) < MAX_REASON + 40 and r.reason.endswith("(4000 more characters)")
    assert sample("pydstack_kms_refused_total", {"reason": "other"}) == before + 1
