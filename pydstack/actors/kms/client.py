"""A client of the KMS RPC (CLI, replica onboarding, tests): JSON over HTTPS, optional RA-TLS.

    async with KmsClient(url) as kms:                       # no pin: the server must attest
        tmp = await kms.call("GetTempCaCert")
    async with KmsClient(url, dev_pki=pki) as kms: ...      # the same, simulated TDX (dev PKI)
    async with KmsClient(url, ca_pem=tmp["ca_cert"], identity=(chain, key),
                         verifier=ratls_verifier) as kms:   # mutual RA-TLS
        keys = await kms.call("GetAppKey", {"api_version": 1, "vm_config": cfg})

With `ca_pem` (the cluster's KMS CA, e.g. from `KmsRootCreated` on the log) TLS checks the
server's chain to it. Without a pin the server must prove it is an attested KMS before a byte
of the request is sent: its certificate names the `kms:rpc` usage and carries RA-TLS evidence
that verifies (bound to its key, quote under Intel's root, or under the dev PKI's root when
`dev_pki` is given: simulated TDX, no real TEE). `call` raises `KmsCallError` (status, error
text, request id) on any non-200 answer; a server that is no attested KMS is `RaTlsPeerRefused`.
"""

from __future__ import annotations

import json
import ssl
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.adapters.tdx.ratls import Attester, issue_ratls_cert
from pydstack.adapters.tdx.ratls_tls import RaTlsConnector, RaTlsVerifier, _pem_files

from .service import key_pem, pem

if TYPE_CHECKING:
    from pydstack.adapters.tdx.pki import DevPki

KMS_RPC_USAGE = "kms:rpc"  # the special usage of a KMS's RPC server certificate


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
        # No chain to check against: the caller checks the server's attestation instead
        # (KmsClient: RaTlsConnector with kms_verifier), before any request byte is sent.
        ctx.verify_mode = ssl.CERT_NONE
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


def kms_verifier(
    *, dev_pki: DevPki | None = None, pccs_url: str = "", cache_seconds: float = 300.0
) -> RaTlsVerifier:
    """What a client without a pinned CA checks of the server: its certificate names the
    `kms:rpc` usage, and its RA-TLS evidence verifies under Intel's root (collateral from
    `pccs_url`, default Intel's PCS) or, simulated, under `dev_pki`'s root."""
    from pydstack.adapters.tdx.collateral import CollateralCache
    from pydstack.adapters.tdx.devpccs import dev_collateral

    from .launch import INTEL_PCCS

    if dev_pki is not None:
        source, root = dev_collateral(dev_pki), dev_pki.root_der
    else:
        source, root = CollateralCache.pccs(pccs_url or INTEL_PCCS), None
    return RaTlsVerifier(source, root_ca_der=root, usage=KMS_RPC_USAGE, cache_seconds=cache_seconds)


class KmsClient:
    def __init__(
        self,
        url: str,
        *,
        ca_pem: str | None = None,
        identity: tuple[str, str] | None = None,
        verifier: RaTlsVerifier | None = None,
        dev_pki: DevPki | None = None,
        timeout: float = 30.0,
        trace_configs: list[aiohttp.TraceConfig] | None = None,
    ) -> None:
        self.url = url.rstrip("/").removesuffix("/prpc")
        if ca_pem is None:
            if verifier is None:
                verifier = kms_verifier(dev_pki=dev_pki)
            elif verifier.usage != KMS_RPC_USAGE:
                raise ValueError(
                    "without a pinned KMS CA (ca_pem) the server's certificate must be checked "
                    f"for the {KMS_RPC_USAGE} usage: pass kms_verifier(...) or ca_pem"
                )
        # The server's evidence is checked against a dev PKI: simulated TDX, no real TEE.
        self.simulated = verifier is not None and verifier.root_ca_der is not None
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
