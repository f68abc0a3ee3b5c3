"""SignCert api_version 1 as dstack v0.5.11's KMS takes it (issue 16 item 7).

v0.5.11 `kms/src/main_service.rs` `sign_cert`: api_version 1 is a SCALE
`CertSigningRequestV1 { confirm, pubkey, config: CertConfig { org_name: Option<String>,
subject, subject_alt_names: Vec<String>, usage_server_auth, usage_client_auth, ext_quote },
quote: Vec<u8>, event_log: Vec<u8> }` (`ra-tls/src/cert.rs`), signed over its encoding,
upgraded to V2 (`Attestation::from_tdx_quote`: the JSON event log, the quote's report_data);
2 is `CertSigningRequestV2`; any other version is refused. The V1 bytes here are written
field by field from that struct, not with pydstack's encoder.
"""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.actors.kms import KmsCallError
from pydstack.adapters.tdx.eventlog import dump_json_event_log
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import OID_APP_ID, ratls_report_data
from pydstack.core.events import KeyIssued, KeyRequested

from .conftest import APP_ID, VM_CONFIG, Kms, make_cvm


def _compact(n: int) -> bytes:  # parity-scale-codec Compact<u32>
    if n < 1 << 6:
        return bytes([n << 2])
    if n < 1 << 14:
        return ((n << 2) | 1).to_bytes(2, "little")
    return ((n << 2) | 2).to_bytes(4, "little")


def _vec(b: bytes) -> bytes:
    return _compact(len(b)) + b


def dstack_csr_v1(
    key: ec.EllipticCurvePrivateKey, quote: bytes, event_log: bytes, *, subject: str = "app.v1"
) -> bytes:
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"".join([
        _vec(b"please sign cert:"),  # confirm
        _vec(spki),  # pubkey
        b"\x01" + _vec(b"Old Org"),  # config.org_name: Some
        _vec(subject.encode()),  # config.subject
        _compact(1) + _vec(subject.encode()),  # config.subject_alt_names
        b"\x01\x00\x00",  # usage_server_auth, usage_client_auth, ext_quote
        _vec(quote),
        _vec(event_log),
    ])  # fmt: skip


async def _v1_body(pki: DevPki, key: ec.EllipticCurvePrivateKey) -> dict[str, object]:
    att = await make_cvm(pki).attest(ratls_report_data(key.public_key()))
    raw = dstack_csr_v1(key, att.quote, dump_json_event_log(att.event_log).encode())
    sig = key.sign(raw, ec.ECDSA(hashes.SHA256()))
    return {"api_version": 1, "csr": raw.hex(), "signature": sig.hex(), "vm_config": VM_CONFIG}


async def test_sign_cert_v1_is_upgraded_and_signed(kms: Kms, pki: DevPki) -> None:
    """A pre-0.5 guest's V1 CSR (quote + JSON event log) gets leaf -> app CA -> root."""
    key = ec.generate_private_key(ec.SECP256R1())
    async with kms.client() as c:
        out = await c.call("SignCert", await _v1_body(pki, key))
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in out["certificate_chain"]]
    leaf, app_ca, root = chain
    leaf.verify_directly_issued_by(app_ca)
    app_ca.verify_directly_issued_by(root)
    assert leaf.public_key() == key.public_key()
    assert leaf.subject.rfc4514_string() == "CN=app.v1,O=Old Org"
    ext = leaf.extensions.get_extension_for_oid(OID_APP_ID).value
    assert isinstance(ext, x509.UnrecognizedExtension) and APP_ID in ext.value
    evs = await kms.events()
    assert isinstance(evs[-2], KeyRequested) and evs[-2].method == "SignCert"
    assert isinstance(evs[-1], KeyIssued) and evs[-1].boot_info.app_id == APP_ID.hex()


async def test_sign_cert_v1_quote_must_bind_the_csr_key(kms: Kms, pki: DevPki) -> None:
    """A V1 CSR whose quote was made for another key is refused (403), as dstack's
    `verify_with_ra_pubkey`; the V1 signature is checked over dstack's encoding."""
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    att = await make_cvm(pki).attest(ratls_report_data(other.public_key()))
    raw = dstack_csr_v1(key, att.quote, dump_json_event_log(att.event_log).encode())
    body = {"api_version": 1, "csr": raw.hex(), "vm_config": VM_CONFIG,
            "signature": key.sign(raw, ec.ECDSA(hashes.SHA256())).hex()}  # fmt: skip
    async with kms.client() as c:
        with pytest.raises(KmsCallError) as info:
            await c.call("SignCert", body)
        assert info.value.status == 403 and "does not bind" in info.value.error
        body["signature"] = other.sign(raw, ec.ECDSA(hashes.SHA256())).hex()
        with pytest.raises(KmsCallError) as info:
            await c.call("SignCert", body)
        assert info.value.status == 400 and "signature" in info.value.error


@pytest.mark.parametrize("version", [0, 3, 7])
async def test_sign_cert_refuses_unknown_versions_by_name(
    kms: Kms, pki: DevPki, version: int
) -> None:
    """api_version other than 1 and 2 is a 400 naming the field; nothing is appended."""
    body = await _v1_body(pki, ec.generate_private_key(ec.SECP256R1()))
    body["api_version"] = version
    before = len(await kms.events())
    async with kms.client() as c:
        with pytest.raises(KmsCallError) as info:
            await c.call("SignCert", body)
    assert info.value.status == 400
    assert f"unsupported api_version {version}" in info.value.error
    assert "\n" not in info.value.error and len(await kms.events()) == before


async def test_get_app_key_takes_api_version_1_at_most(kms: Kms, pki: DevPki) -> None:
    """dstack's `get_app_key`: `api_version > 1` is refused (here a 400 naming it), unlogged."""
    before = len(await kms.events())
    async with kms.client() as c:
        with pytest.raises(KmsCallError) as info:
            await c.call("GetAppKey", {"api_version": 2, "vm_config": VM_CONFIG})
    assert info.value.status == 400 and "unsupported api_version 2" in info.value.error
    assert len(await kms.events()) == before
