"""App keys from a KMS over mutual RA-TLS (dstack's `KeyProvider::Kms`), and env decryption.

Flow (dstack-util `request_app_keys_from_kms_url`): ask the KMS for its temp CA and root CA
(`GetTempCaCert`, no client certificate, nothing trusted yet), issue an RA-TLS client
certificate under the temp CA whose quote binds the certificate key, then call `GetAppKey`
and `GetMeta` presenting it, on a connection whose server passed the checks of
`pydstack_guest.kms_trust` (root pin, TLS chain, ``kms:rpc``, issuer, RA-TLS) before a byte
was sent; the keys count only once their k256 root is attested and signs them. The keys name
this KMS and its verified root CA: the agent's certificates (`GetTlsKey`, the gateway's
client certificate) come from its `SignCert` (`cert_client.py`), never from the temp CA.

    provider = KmsKeyProvider("https://kms:9100", backend, trust=KmsTrust.dev(pki),
                              app_id=app_id, root_pin=compose_key_provider_id)
    agent = await GuestAgent.create(backend, provider, config)
    provider.verified      # what was checked, for the boot log
    envs = decrypt_env(agent.keys.env_crypt_key, encrypted_blob)
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pydstack.adapters.tdx.attestation import Attestation
from pydstack.adapters.tdx.backend import TdxBackend
from pydstack.adapters.tdx.eventlog import runtime_events_of
from pydstack.adapters.tdx.ratls import RaTlsResult, issue_ratls_cert
from pydstack.adapters.tdx.ratls_tls import client_ssl_context, peer_cert_der

from .kms_trust import (
    KmsCheckFailed,
    KmsTrust,
    check_k256_root,
    check_k256_signature,
    check_root_pin,
    check_server,
    fingerprint,
    spki_of,
)
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


class _CheckedConnector(aiohttp.TCPConnector):
    """Runs `check` on the server's certificate after the handshake, before any request byte
    (aiohttp has no public hook; `_create_connection` is stable through 3.x, as in
    `RaTlsConnector`); the results are kept for the caller."""

    def __init__(self, check: Callable[[bytes], Awaitable[RaTlsResult]], **kw: Any) -> None:
        super().__init__(**kw)
        self._check = check
        self.results: list[RaTlsResult] = []

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        proto = await super()._create_connection(req, traces, timeout)
        der = peer_cert_der(proto.transport)
        try:
            if der is None:
                raise KmsCheckFailed("tls-chain", "the server sent no certificate")
            self.results.append(await self._check(der))
        except BaseException:
            proto.close()
            raise
        return proto


class KmsKeyProvider:
    """`KeyProvider` that fetches the app keys from a KMS it verified, once; then serves them
    from memory. `root_pin`: app-compose's ``key_provider_id`` (empty: none, said loudly in
    `verified`); `app_id`: this CVM's measured app id (the KMS signs the app key for it)."""

    def __init__(
        self,
        url: str,
        backend: TdxBackend,
        *,
        trust: KmsTrust,
        app_id: bytes,
        root_pin: bytes = b"",
        vm_config: str = "",
        sys_config: str = "",
        timeout: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/").removesuffix("/prpc")
        self.attester = _BackendAttester(
            backend, sys_config or json.dumps({"vm_config": vm_config})
        )
        self.vm_config = vm_config
        self.trust, self.app_id, self.root_pin = trust, app_id, root_pin
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.verified = ""  # what the checks established, once `fetch` succeeded
        # For RTMR3 (dstack's mr-kms and os-image-hash), once `fetch` succeeded: the verified
        # server's mr_aggregated (None: its certificate carried no attestation) and the image
        # hash the KMS answered (b"": it named none).
        self.mr_kms: bytes | None = None
        self.os_image_hash = b""
        self._keys: AppKeys | None = None

    async def _call(
        self, s: aiohttp.ClientSession, method: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        try:
            async with s.post(f"{self.url}/prpc/KMS.{method}", json=body) as resp:
                out = json.loads(await resp.text())
                if resp.status != 200:
                    raise KeyProviderError(
                        f"KMS {self.url} refused {method} ({resp.status}): "
                        f"{out.get('error', out) if isinstance(out, dict) else out}"
                    )
        except aiohttp.ClientConnectorCertificateError as e:
            raise KmsCheckFailed("tls-chain", f"the server's TLS chain does not verify to the "
                                 f"KMS root CA: {e.certificate_error}") from None  # fmt: skip
        except (aiohttp.ClientError, OSError, ValueError) as e:
            raise KeyProviderError(f"KMS {self.url} {method}: {e}") from None
        if not isinstance(out, dict):
            raise KeyProviderError(f"KMS {self.url} {method}: answer is not a JSON object")
        return out

    async def _temp_ca(self) -> dict[str, Any]:
        """GetTempCaCert: nothing is trusted yet (dstack: tls_no_check), its answer is checked."""
        plain = ssl.create_default_context()
        plain.check_hostname = False
        plain.verify_mode = ssl.CERT_NONE
        conn = aiohttp.TCPConnector(ssl=plain)
        async with aiohttp.ClientSession(connector=conn, timeout=self.timeout) as s:
            return await self._call(s, "GetTempCaCert", {})

    async def fetch(self) -> AppKeys:
        tmp = await self._temp_ca()
        try:
            root_pem = str(tmp["ca_cert"])
            root = x509.load_pem_x509_certificate(root_pem.encode())
            temp_cert = x509.load_pem_x509_certificate(str(tmp["temp_ca_cert"]).encode())
            temp_key = serialization.load_pem_private_key(str(tmp["temp_ca_key"]).encode(), None)
        except (KeyError, ValueError, TypeError) as e:
            raise KeyProviderError(
                f"KMS {self.url} GetTempCaCert answer is malformed: {e}"
            ) from None
        if not isinstance(temp_key, ec.EllipticCurvePrivateKey):
            raise KeyProviderError("KMS temp CA key is not an EC key")
        if self.root_pin:
            check_root_pin(root, self.root_pin)
        now = int(time.time())
        key, cert = await issue_ratls_cert(
            self.attester, subject="pydstack guest", not_before=now - 60, not_after=now + 3600,
            issuer=(temp_cert, temp_key),
        )  # fmt: skip
        chain = cert.public_bytes(serialization.Encoding.PEM).decode() + str(tmp["temp_ca_cert"])
        ctx = client_ssl_context(chain, _pem_key(key), root_pem)
        conn = _CheckedConnector(lambda der: check_server(der, root, self.trust), ssl=ctx)
        async with aiohttp.ClientSession(connector=conn, timeout=self.timeout) as s:
            body = {"api_version": 1, "vm_config": self.vm_config}
            keys = await self._call(s, "GetAppKey", body)
            meta = await self._call(s, "GetMeta", {})
        server = conn.results[-1]  # every connection was checked; they all presented one key
        ca_spki = spki_of(root)
        k256_root = await check_k256_root(meta, ca_spki, server, self.trust, now=now)
        try:
            k256_key, k256_sig = (
                bytes.fromhex(keys["k256_key"]),
                bytes.fromhex(keys["k256_signature"]),
            )
            app_keys = AppKeys(
                k256_key=k256_key, k256_signature=k256_sig, ca_cert_pem=str(tmp["temp_ca_cert"]),
                ca_key_pem=str(tmp["temp_ca_key"]),
                disk_crypt_key=bytes.fromhex(keys["disk_crypt_key"]),
                env_crypt_key=bytes.fromhex(keys["env_crypt_key"]),
                gateway_app_id=str(keys.get("gateway_app_id", "")), provider_name="kms",
                provider_id=ca_spki, kms_root_public=k256_root, kms_url=self.url,
                kms_ca_cert_pem=root_pem,
            )  # fmt: skip
        except (KeyError, ValueError, TypeError) as e:
            raise KeyProviderError(f"KMS {self.url} GetAppKey answer is malformed: {e}") from None
        check_k256_signature(k256_key, k256_sig, self.app_id, k256_root)
        self.verified = self._summary(server, ca_spki)
        self.mr_kms = server.app_info.mr_aggregated if server.app_info else None
        try:
            self.os_image_hash = bytes.fromhex(str(keys.get("os_image_hash") or ""))
        except ValueError:
            raise KeyProviderError(f"KMS {self.url} GetAppKey os_image_hash is not hex") from None
        return app_keys

    def _summary(self, server: RaTlsResult, ca_spki: bytes) -> str:
        kms_app = server.app_info.app_id.hex()[:16] if server.app_info else "?"
        pin = (f"root CA {fingerprint(ca_spki)}… pinned by app-compose" if self.root_pin else
               f"WARNING: KMS root NOT PINNED (app-compose has no key_provider_id): any "
               f"attested KMS is accepted; this one's root CA is {fingerprint(ca_spki)}…, "
               f"pin it with key_provider_id={ca_spki.hex()}")  # fmt: skip
        return (f"kms:rpc, {self.trust.describe()} (KMS app {kms_app}…), k256 root attested "
                f"and signing the app key; {pin}")  # fmt: skip

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
