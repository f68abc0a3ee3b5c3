"""App keys from a KMS over mutual RA-TLS (dstack's `KeyProvider::Kms`), and env decryption.

Flow (dstack-util `request_app_keys_from_kms_url`): ask the KMS for its temp CA
(`GetTempCaCert`, no client certificate), issue an RA-TLS client certificate under it whose
quote binds the certificate key, then call `GetAppKey` presenting it; the KMS's own server
certificate must chain to the cluster CA and, with a verifier, carry acceptable evidence.
The agent's local CA (for `GetTlsKey`) is the temp CA, as dstack's client certificates are.

    provider = KmsKeyProvider("https://kms:9100", backend, verifier=verifier)
    agent = await GuestAgent.create(backend, provider, config)
    envs = decrypt_env(agent.keys.env_crypt_key, encrypted_blob)
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pydstack.adapters.tdx.attestation import Attestation
from pydstack.adapters.tdx.backend import TdxBackend
from pydstack.adapters.tdx.eventlog import runtime_events_of
from pydstack.adapters.tdx.ratls import issue_ratls_cert
from pydstack.adapters.tdx.ratls_tls import RaTlsConnector, RaTlsVerifier, client_ssl_context

from .provider import AppKeys, KeyProviderError


class _BackendAttester:
    def __init__(self, backend: TdxBackend, sys_config: str) -> None:
        self.backend, self.sys_config = backend, sys_config

    async def attest(self, report_data: bytes) -> Attestation:
        data = report_data.ljust(64, b"\x00")
        quote, log = await asyncio.to_thread(self.backend.attest, data)
        return Attestation(quote, tuple(log), tuple(runtime_events_of(log)), data, self.sys_config)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


class KmsKeyProvider:
    """`KeyProvider` that fetches the app keys from a KMS once, then serves them from memory."""

    def __init__(
        self,
        url: str,
        backend: TdxBackend,
        *,
        vm_config: str = "",
        sys_config: str = "",
        verifier: RaTlsVerifier | None = None,
        ca_pem: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/").removesuffix("/prpc")
        self.attester = _BackendAttester(
            backend, sys_config or json.dumps({"vm_config": vm_config})
        )
        self.vm_config = vm_config
        self.verifier = verifier
        self.ca_pem = ca_pem  # pin the cluster CA; None = take it from GetTempCaCert
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._keys: AppKeys | None = None

    async def _post(
        self, ctx: ssl.SSLContext, method: str, body: dict[str, Any], ratls: bool
    ) -> dict[str, Any]:
        conn: aiohttp.TCPConnector = (
            RaTlsConnector(self.verifier, ssl=ctx, force_close=True)
            if ratls and self.verifier is not None
            else aiohttp.TCPConnector(ssl=ctx, force_close=True)
        )
        try:
            async with aiohttp.ClientSession(connector=conn, timeout=self.timeout) as s:
                async with s.post(f"{self.url}/prpc/KMS.{method}", json=body) as resp:
                    out = json.loads(await resp.text())
                    if resp.status != 200:
                        raise KeyProviderError(
                            f"KMS {self.url} refused {method} ({resp.status}): "
                            f"{out.get('error', out) if isinstance(out, dict) else out}"
                        )
        except (aiohttp.ClientError, OSError, ValueError) as e:
            raise KeyProviderError(f"KMS {self.url} {method}: {e}") from None
        if not isinstance(out, dict):
            raise KeyProviderError(f"KMS {self.url} {method}: answer is not a JSON object")
        return out

    async def fetch(self) -> AppKeys:
        plain = ssl.create_default_context()
        plain.check_hostname = False
        if self.ca_pem is None:
            plain.verify_mode = ssl.CERT_NONE  # the CA it names is measured as key-provider id
        else:
            plain.load_verify_locations(cadata=self.ca_pem)
        tmp = await self._post(plain, "GetTempCaCert", {}, ratls=False)
        ca_pem = self.ca_pem or str(tmp["ca_cert"])
        temp_cert = x509.load_pem_x509_certificate(str(tmp["temp_ca_cert"]).encode())
        temp_key = serialization.load_pem_private_key(str(tmp["temp_ca_key"]).encode(), None)
        if not isinstance(temp_key, ec.EllipticCurvePrivateKey):
            raise KeyProviderError("KMS temp CA key is not an EC key")
        now = int(time.time())
        key, cert = await issue_ratls_cert(
            self.attester,
            subject="pydstack guest",
            not_before=now - 60,
            not_after=now + 3600,
            issuer=(temp_cert, temp_key),
        )
        chain = cert.public_bytes(serialization.Encoding.PEM).decode() + str(tmp["temp_ca_cert"])
        ctx = client_ssl_context(chain, _pem_key(key), ca_pem)
        keys = await self._post(
            ctx, "GetAppKey", {"api_version": 1, "vm_config": self.vm_config}, ratls=True
        )
        meta = await self._post(plain, "GetMeta", {}, ratls=False)
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        try:
            return AppKeys(
                k256_key=bytes.fromhex(keys["k256_key"]),
                k256_signature=bytes.fromhex(keys["k256_signature"]),
                ca_cert_pem=str(tmp["temp_ca_cert"]),
                ca_key_pem=str(tmp["temp_ca_key"]),
                disk_crypt_key=bytes.fromhex(keys["disk_crypt_key"]),
                env_crypt_key=bytes.fromhex(keys["env_crypt_key"]),
                gateway_app_id=str(keys.get("gateway_app_id", "")),
                provider_name="kms",
                provider_id=ca.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
                kms_root_public=bytes.fromhex(meta["k256_pubkey"]),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise KeyProviderError(f"KMS {self.url} GetAppKey answer is malformed: {e}") from None

    async def app_keys(self) -> AppKeys:
        if self._keys is None:
            self._keys = await self.fetch()
        return self._keys


def decrypt_env(env_crypt_key: bytes, blob: bytes) -> list[tuple[str, str]]:
    """dstack's encrypted env: `ephemeral X25519 pub(32) || iv(12) || AES-256-GCM(JSON)`."""
    if len(blob) < 32 + 12 + 16:
        raise KeyProviderError(f"encrypted env is {len(blob)} bytes, too short")
    priv = x25519.X25519PrivateKey.from_private_bytes(env_crypt_key)
    shared = priv.exchange(x25519.X25519PublicKey.from_public_bytes(blob[:32]))
    try:
        plain = AESGCM(shared).decrypt(blob[32:44], blob[44:], None)
        doc = json.loads(plain)
        return [(str(e["key"]), str(e["value"])) for e in doc["env"]]
    except Exception as e:
        raise KeyProviderError(f"encrypted env does not decrypt with this app's key: {e}") from None
