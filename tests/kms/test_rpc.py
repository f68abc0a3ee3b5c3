"""SignCert, the public methods, and the backends' edge cases."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.actors.kms import BackendConfigError, DevBackend, KmsCallError, WebhookBackend
from pydstack.adapters.tdx.attestation import encode_attestation
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import OID_APP_ID, ratls_report_data
from pydstack.core.events import KeyIssued
from pydstack.core.kms import BootInfo, CertConfig, Csr, encode_csr

from .conftest import APP_ID, VM_CONFIG, Kms, make_cvm


def _csr(key: ec.EllipticCurvePrivateKey, attestation: bytes) -> tuple[bytes, bytes]:
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    config = CertConfig(subject="app.example", subject_alt_names=("app.example",),
                        usage_server_auth=True)  # fmt: skip
    raw = encode_csr(Csr("please sign cert:", spki, config), attestation)
    return raw, key.sign(raw, ec.ECDSA(hashes.SHA256()))


async def test_sign_cert_issues_under_the_app_ca(kms: Kms, pki: DevPki) -> None:
    """An attested CSR gets cert -> app CA -> root CA, the app id embedded; logged as a decision."""
    cvm = make_cvm(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    att = encode_attestation(await cvm.attest(ratls_report_data(key.public_key())))
    raw, sig = _csr(key, att)
    body = {"api_version": 2, "csr": raw.hex(), "signature": sig.hex(), "vm_config": VM_CONFIG}
    async with kms.client() as c:
        out = await c.call("SignCert", body)
        chain = [x509.load_pem_x509_certificate(p.encode()) for p in out["certificate_chain"]]
        leaf, app_ca, root = chain
        leaf.verify_directly_issued_by(app_ca)
        app_ca.verify_directly_issued_by(root)
        assert root.public_key() == kms.svc.root.ca_key().public_key()
        ext = leaf.extensions.get_extension_for_oid(OID_APP_ID).value
        assert isinstance(ext, x509.UnrecognizedExtension) and APP_ID in ext.value
        # The same attestation under another key's CSR does not bind it.
        other = ec.generate_private_key(ec.SECP256R1())
        raw2, sig2 = _csr(other, att)
        body2 = {"api_version": 2, "csr": raw2.hex(), "signature": sig2.hex()}
        with pytest.raises(KmsCallError) as info:
            await c.call("SignCert", body2)
        assert info.value.status == 403 and "does not bind" in info.value.error
        # A CSR whose signature does not verify is a caller error: 400, nothing appended.
        before = len(await kms.events())
        bad = {"api_version": 2, "csr": raw.hex(), "signature": sig2.hex()}
        with pytest.raises(KmsCallError) as info:
            await c.call("SignCert", bad)
        assert info.value.status == 400 and len(await kms.events()) == before
    assert sum(isinstance(e, KeyIssued) for e in await kms.events()) == 1


async def test_public_methods_need_no_client_certificate(kms: Kms) -> None:
    """GetMeta/GetTempCaCert answer without a cert; GetAppKey without one is 401, unlogged."""
    before = len(await kms.events())
    async with kms.client() as c:
        meta = await c.call("GetMeta")
        assert meta["k256_pubkey"] == kms.svc.root.k256_public().hex()
        assert meta["is_dev"] is False
        with pytest.raises(KmsCallError) as info:
            await c.call("GetAppKey", {"vm_config": ""})
        assert info.value.status == 401
    assert len(await kms.events()) == before


def test_dev_backend_is_refused_unless_enabled() -> None:
    """The allow-all backend cannot be built by accident."""
    with pytest.raises(BackendConfigError, match="enable it explicitly"):
        DevBackend()
    assert DevBackend(enabled=True).name == "dev"


async def test_unreachable_webhook_refuses() -> None:
    """A webhook that cannot be reached is a denial with the cause, never an allow."""
    boot = BootInfo(tcb_status="UpToDate", app_id="00" * 20)
    async with WebhookBackend("http://127.0.0.1:9", timeout=2) as hook:
        verdict = await hook.authorize_app(boot)
    assert not verdict.is_allowed and "failed" in verdict.reason
