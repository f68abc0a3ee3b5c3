"""Replica onboarding: a new KMS instance gets the cluster's root keys from a running one.

Both sides attest: the replica checks the source's RA-TLS server certificate (evidence, and
the source's authorization: `KmsAuthority.authorize_source`) before asking; the source checks
the replica's RA-TLS client certificate and its authorization (`bootAuth/kms` of a webhook or
contract backend; with the dev backend the source's onboarding token, which the replica sends
inside the mutual RA-TLS channel, or an allow-listed measurement) before releasing, and stores
`KeyRequested`, `KeyIssued` and `KmsReplicaOnboarded` (naming that authorization) together.
The replica accepts the keys only if they match the public keys of `KmsRootCreated` on the
shared log, then seals them.

    root = await onboard_replica(store, settings, source_url=url, attester=agent,
                                 backend=backend, collateral=src, keyfile=keyfile,
                                 token=read_token(token_file))
"""

from __future__ import annotations

import asyncio
import ssl
import time
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.adapters.nats import EventStore
from pydstack.adapters.tdx.ratls import Attester
from pydstack.adapters.tdx.ratls_tls import RaTlsVerifier
from pydstack.core.events import subject
from pydstack.core.kms import AuthBackend, RootKeys, k256_public

from .authority import KmsAuthority
from .client import KmsClient, plain_context, ratls_identity
from .evidence import CollateralSource, check_certificate
from .keystore import RootKeyFile
from .service import KmsError, _load_state


async def server_certificate(url: str, ca_pem: str) -> bytes:
    """The DER certificate a TLS server presents (chain checked against `ca_pem`)."""
    parts = urlsplit(url)
    ctx = plain_context(ca_pem)
    _, writer = await asyncio.open_connection(parts.hostname, parts.port or 443, ssl=ctx)
    try:
        obj = writer.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True) if isinstance(obj, ssl.SSLObject) else None
    finally:
        writer.close()
    if not der:
        raise KmsError(f"{url} presented no certificate")
    return bytes(der)


async def onboard_replica(
    store: EventStore,
    settings_cluster: str,
    *,
    source_url: str,
    attester: Attester,
    backend: AuthBackend,
    collateral: CollateralSource,
    keyfile: RootKeyFile,
    root_ca_der: bytes | None = None,
    vm_config: str = "",
    max_age: int = 3600,
    token: str = "",
    authority: KmsAuthority | None = None,
) -> RootKeys:
    """`token`: the source's onboarding token (its dev backend authorizes no KMS without it
    or an allow-listed measurement); `authority`: how this replica judges the source."""
    state = await _load_state(store, subject("kms", settings_cluster))
    created = state.root
    if created is None:
        raise KmsError(f"cluster {settings_cluster!r} has no root keys on the log to onboard")
    if keyfile.exists():
        raise KmsError(f"{keyfile.path} exists: this instance is already onboarded")
    ca = created.ca_cert_pem
    der = await server_certificate(source_url, ca)
    from pydstack.adapters.tdx.verify import Policy

    ev = await check_certificate(
        der,
        collateral,
        policy=Policy(),
        now=int(time.time()),
        root_ca_der=root_ca_der,
        max_age=10 * 365 * 86400,  # the source's RPC cert lives as long as the source runs
    )
    if ev.reasons or ev.boot is None:
        raise KmsError("source KMS attestation refused: " + "; ".join(ev.reasons))
    authority = authority or KmsAuthority()
    verdict, _ = await authority.authorize_source(backend, ev.boot, ev.quote)
    if not verdict.is_allowed:
        raise KmsError(f"source KMS not allowed by backend {backend.name}: {verdict.reason}")
    async with KmsClient(source_url, ca_pem=ca) as kms:
        tmp = await kms.call("GetTempCaCert")
    identity = await ratls_identity(attester, tmp["temp_ca_cert"], tmp["temp_ca_key"])

    async def same(_q: bytes) -> object:
        return await collateral(_q)

    verifier = RaTlsVerifier(collateral, root_ca_der=root_ca_der)
    async with KmsClient(source_url, ca_pem=ca, identity=identity, verifier=verifier) as kms:
        body = {"vm_config": vm_config, **({"onboard_token": token} if token else {})}
        resp = await kms.call("GetKmsKey", body)
    keys = resp.get("keys")
    if not isinstance(keys, list) or len(keys) != 1:
        raise KmsError("source KMS returned no root keys")
    ca_key = serialization.load_pem_private_key(keys[0]["ca_key"].encode(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise KmsError("source KMS returned a CA key that is not P-256")
    root = RootKeys(
        ca_scalar=ca_key.private_numbers().private_value, k256=bytes.fromhex(keys[0]["k256_key"])
    )
    if root.ca_public_der() != created.ca_public_key or k256_public(root.k256) != (
        created.k256_public_key
    ):
        raise KmsError("source KMS returned keys that do not match KmsRootCreated on the log")
    await keyfile.save(root)
    return root
