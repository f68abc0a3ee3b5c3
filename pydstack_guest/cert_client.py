"""Certificates for a CVM's keys from its KMS (`SignCert`), as dstack's ``CertRequestClient``.

With the KMS key provider, what the agent's ``GetTlsKey`` returns and the client certificate
the CVM registers with at the gateway are issued by the KMS under the app's own CA: chain
leaf, app CA (``app:ca``, the app id), KMS root CA. The request is dstack's
``CertSigningRequestV2`` with an attestation binding the key
(``sha512("ratls-cert:" || spki)``), signed with that key; the KMS embeds the attestation
(``ext_quote``) and its AppInfo (``ext_app_info``) when asked. Only local dev keys
(`LocalKeyProvider`) sign locally, with their own CA.

The KMS is the one the boot verified (`kms_trust`): TLS must chain to its root CA, and the
answer counts only as a chain for this very key that verifies to that root through a CA of
this app, so a server that is not the KMS cannot hand out a usable certificate.

    chain = await request_certificate(keys, key, CertConfig(subject="app", ...),
                                      encode_attestation(att), vm_config=cfg, app_id=app_id)
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.adapters.tdx.errors import TdxError
from pydstack.adapters.tdx.ratls import app_id_of, special_usage
from pydstack.core.kms import CertConfig, Csr, encode_csr
from pydstack.core.kms.csr import CONFIRM

from .provider import AppKeys, KeyProviderError


class CertRequestError(KeyProviderError):
    """The KMS did not issue the certificate, or its answer is not a chain for this key."""


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def signed_csr(
    key: ec.EllipticCurvePrivateKey, config: CertConfig, attestation: bytes
) -> tuple[bytes, bytes]:
    """(CertSigningRequestV2 encoding, its ECDSA-SHA256 signature by `key`)."""
    raw = encode_csr(Csr(CONFIRM, _spki(key.public_key()), config), attestation)
    return raw, key.sign(raw, ec.ECDSA(hashes.SHA256()))


def check_chain(
    chain: list[str], key: ec.EllipticCurvePublicKey, root_pem: str, app_id: bytes
) -> None:
    """The KMS's answer must be leaf (this key), this app's CA, the root the boot verified."""
    try:
        certs = [x509.load_pem_x509_certificate(p.encode()) for p in chain]
        root = x509.load_pem_x509_certificate(root_pem.encode())
    except (ValueError, TypeError) as e:
        raise CertRequestError(f"SignCert answer: a certificate does not parse: {e}") from None
    if len(certs) != 3:
        raise CertRequestError(f"SignCert answered {len(certs)} certificates, not leaf, app CA "
                               "and KMS root")  # fmt: skip
    leaf, app_ca, top = certs
    der = serialization.Encoding.DER
    if top.public_bytes(der) != root.public_bytes(der):
        raise CertRequestError("SignCert answer does not end at the KMS root CA the boot verified")
    if leaf.public_key() != key:
        raise CertRequestError("SignCert answer is a certificate for another key")
    try:
        app_ca.verify_directly_issued_by(root)
        leaf.verify_directly_issued_by(app_ca)
        ok = special_usage(app_ca) == "app:ca" and app_id_of(app_ca) == app_id_of(leaf) == app_id
    except (ValueError, TypeError, InvalidSignature, TdxError):
        ok = False
    if not ok:
        raise CertRequestError(f"SignCert answer is no chain through app {app_id.hex()}'s CA "
                               "to the KMS root")  # fmt: skip


async def request_certificate(
    keys: AppKeys,
    key: ec.EllipticCurvePrivateKey,
    config: CertConfig,
    attestation: bytes,
    *,
    vm_config: str,
    app_id: bytes,
    timeout: float = 30.0,
) -> list[str]:
    """The chain (PEM, leaf first) the KMS of `keys` issues for `key`."""
    if not keys.kms_url or not keys.kms_ca_cert_pem:
        raise CertRequestError("these app keys came from no KMS: no SignCert to ask")
    raw, sig = signed_csr(key, config, attestation)
    ctx = ssl.create_default_context(cadata=keys.kms_ca_cert_pem)
    ctx.check_hostname = False  # the KMS is named by its root CA, not a DNS name
    body = {"api_version": 2, "csr": raw.hex(), "signature": sig.hex(), "vm_config": vm_config}
    url = f"{keys.kms_url}/prpc/KMS.SignCert"
    try:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx),
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as s,
            s.post(url, json=body) as resp,
        ):
            out: Any = json.loads(await resp.text())
            status = resp.status
    except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as e:
        raise CertRequestError(f"KMS {keys.kms_url} SignCert: {type(e).__name__}: {e}") from None
    if status != 200 or not isinstance(out, dict):
        why = out.get("error", out) if isinstance(out, dict) else out
        raise CertRequestError(f"KMS {keys.kms_url} refused SignCert ({status}): {why}")
    chain = out.get("certificate_chain")
    if not isinstance(chain, list) or not all(isinstance(p, str) for p in chain):
        raise CertRequestError("SignCert answer has no certificate_chain list")
    check_chain(chain, key.public_key(), keys.kms_ca_cert_pem, app_id)
    return chain
