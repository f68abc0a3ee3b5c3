"""A client of the KMS RPC (CLI, replica onboarding, tests): JSON over HTTPS, optional RA-TLS.

    async with KmsClient(url) as kms:                       # no client cert, no server pin
        tmp = await kms.call("GetTempCaCert")
    async with KmsClient(url, ca_pem=tmp["ca_cert"], identity=(chain, key),
                         verifier=ratls_verifier) as kms:   # mutual RA-TLS
        keys = await kms.call("GetAppKey", {"api_version": 1, "vm_config": cfg})

`call` raises `KmsCallError` (status, error text, request id) on any non-200 answer.
"""

from __future__ import annotations

import json
import ssl
import time
from types import TracebackType
from typing import Any, Self

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.adapters.tdx.ratls import Attester, issue_ratls_cert
from pydstack.adapters.tdx.ratls_tls import RaTlsConnector, RaTlsVerifier, _pem_files

from .service import key_pem, pem


class KmsCallError(Exception):
    def __init__(self, method: str, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"KMS.{method} answered {status}: {body.get('error', body)}")
        self.method = method
        self.status = status
        self.error = str(body.get("error", ""))
        self.request_id = str(body.get("request_id", ""))
        self.body = body


def plain_context(ca_pem: str | None) -> ssl.SSLContext:
    # Not create_default_context(): loading the system CA store costs tens of ms per client,
    # and a KMS is never checked against public CAs anyway.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # identity is the pinned CA / the attestation, not a DNS name
    if ca_pem is None:
        ctx.verify_mode = ssl.CERT_NONE  # trust comes from signatures checked by the caller
    else:
        ctx.load_verify_locations(cadata=ca_pem)
    return ctx


def client_context(ca_pem: str | None, identity: tuple[str, str] | None) -> ssl.SSLContext:
    """The client's TLS context; with `identity` (chain PEM, key PEM) it presents that RA-TLS
    certificate (mutual RA-TLS)."""
    ctx = plain_context(ca_pem)
    if identity is not None:
        if ca_pem is None:
            raise ValueError("mutual RA-TLS needs the KMS CA (ca_pem) to check the server")
        with _pem_files(identity[0], identity[1]) as (chain_path, key_path):
            ctx.load_cert_chain(chain_path, key_path)
    return ctx


class KmsClient:
    def __init__(
        self,
        url: str,
        *,
        ca_pem: str | None = None,
        identity: tuple[str, str] | None = None,
        verifier: RaTlsVerifier | None = None,
        timeout: float = 30.0,
        trace_configs: list[aiohttp.TraceConfig] | None = None,
    ) -> None:
        self.url = url.rstrip("/").removesuffix("/prpc")
        ctx = client_context(ca_pem, identity)
        conn: aiohttp.TCPConnector = (
            RaTlsConnector(verifier, ssl=ctx, force_close=True)
            if verifier is not None
            else aiohttp.TCPConnector(ssl=ctx, force_close=True)
        )
        self._session = aiohttp.ClientSession(
            connector=conn,
            timeout=aiohttp.ClientTimeout(total=timeout),
            trace_configs=trace_configs,  # e.g. bench.kms times the connection set-up
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._session.close()

    async def raw(self, method: str, data: bytes) -> tuple[int, dict[str, Any]]:
        async with self._session.post(
            f"{self.url}/prpc/KMS.{method}", data=data, headers={"Content-Type": "application/json"}
        ) as resp:
            text = await resp.text()
            try:
                body = json.loads(text)
            except ValueError:
                body = {"error": text}
            return resp.status, body if isinstance(body, dict) else {"error": body}

    async def call(self, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        status, out = await self.raw(method, json.dumps(body or {}).encode())
        if status != 200:
            raise KmsCallError(method, status, out)
        return out


async def ratls_identity(
    attester: Attester, temp_ca_cert_pem: str, temp_ca_key_pem: str, *, subject: str = "RA-TLS"
) -> tuple[str, str]:
    """A fresh RA-TLS client certificate under the cluster's temp CA: (chain PEM, key PEM)."""
    from cryptography.hazmat.primitives import serialization

    ca = x509.load_pem_x509_certificate(temp_ca_cert_pem.encode())
    ca_key = serialization.load_pem_private_key(temp_ca_key_pem.encode(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("temp CA key is not an EC key")
    now = int(time.time())
    key, cert = await issue_ratls_cert(
        attester, subject=subject, not_before=now - 60, not_after=now + 3600, issuer=(ca, ca_key)
    )
    return pem(cert) + temp_ca_cert_pem, key_pem(key)
