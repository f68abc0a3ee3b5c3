"""How a CVM decides that a KMS is its KMS, before it uses a single key from it.

The host writes the KMS URL (sys-config), so it can point a CVM at any server. dstack-util's
`request_app_keys_from_kms_url` checks the server certificate's special usage and, after
boot, that the KMS root CA is the app-compose's `key_provider_id`. Here every check runs
before the keys are used, each failure names its check (`KmsCheckFailed.check`), and the
root is only ever the one the app owner measured (app-compose's ``key_provider_id``: the DER
SubjectPublicKeyInfo of the KMS root CA, as dstack's), never sys-config's ``kms_ca``:

1. ``root-pin``: the root CA the KMS names is the pinned one (unpinned: taken as named, and
   the boot says so loudly);
2. ``tls-chain``: the server's TLS chain verifies to that root;
3. ``kms:rpc``: the server certificate names dstack's special usage ``kms:rpc`` (an app's
   `SignCert` certificate says ``app:custom``);
4. ``issuer``: and the root CA signed it directly (an app certificate comes through its app CA);
5. ``ra-tls``: its RA-TLS evidence verifies (dcap-qvl: Intel's root, or a simulator's dev root
   handed over by the host share, reported as *simulated*) and binds its key;
   (1-5 run after the handshake, before a request byte is sent)
6. ``root-attestation``: the k256 root comes from GetMeta's ``bootstrap_info``: a quote made
   when the root was created, binding ``ca_pubkey`` and ``k256_pubkey`` as dstack's KMS does
   (`kms_bootstrap_report_data`), by a TD of the same KMS app
   (app id and compose hash) as the server of step 5, for the CA of step 1;
7. ``k256-signature``: GetAppKey's ``k256_signature`` over this app's key recovers that root.

    trust = KmsTrust.dev(pki)        # or KmsTrust.intel(pccs_url) on TDX
    server = await check_server(der, root_ca, trust)            # in the TLS connector
    root = await check_k256_root(meta, spki_of(root_ca), server, trust, now=now)
    check_k256_signature(k256_key, k256_signature, app_id, root)
"""

from __future__ import annotations

import os
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from pydstack.adapters.tdx.attestation import AttestationDecodeError, decode_attestation
from pydstack.adapters.tdx.collateral import INTEL_PCS, CollateralCache
from pydstack.adapters.tdx.errors import TdxError
from pydstack.adapters.tdx.identity import keccak256, kms_bootstrap_report_data
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import (
    CollateralSource,
    RaTlsResult,
    check_attestation,
    report_data_for,
    special_usage,
)
from pydstack.adapters.tdx.ratls_tls import RaTlsVerifier
from pydstack.adapters.tdx.verify import Policy

from .keys import KMS_ISSUED_PREFIX, KeyError_, k256_public, recover_k256
from .provider import KeyProviderError

KMS_RPC_USAGE = "kms:rpc"
# The report_data tag pydstack's KMS bound its bootstrap quote with before it bound it as
# dstack does (`kms_bootstrap_report_data`): still accepted, for roots created then.
KMS_ROOT_TAG = b"pydstack-kms-root"
CHECKS = ("root-pin", "tls-chain", KMS_RPC_USAGE, "issuer", "ra-tls", "root-attestation",
          "k256-signature")  # fmt: skip


class KmsCheckFailed(KeyProviderError):
    """A KMS failed one of the checks above; `check` names it, no key of it is used."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"check {check} failed: {reason}")
        self.check, self.reason = check, reason


class KmsTrust:
    """What the CVM's KMS checks trust: quote collateral, the quote root (None: Intel's) and
    the TCB policy. One per boot: the verifier caches results per certificate."""

    def __init__(
        self,
        collateral: CollateralSource,
        *,
        root_ca_der: bytes | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.collateral, self.root_ca_der, self.policy = collateral, root_ca_der, policy
        self.verifier = RaTlsVerifier(collateral, policy=policy, root_ca_der=root_ca_der)

    @classmethod
    def intel(cls, pccs_url: str = "") -> KmsTrust:
        """Real TDX: Intel's root, collateral from a PCCS (sys-config's, else Intel's PCS)."""
        return cls(CollateralCache.pccs(pccs_url or INTEL_PCS))

    @classmethod
    def dev(cls, pki: DevPki | str | os.PathLike[str]) -> KmsTrust:
        """A simulated TD: quotes of this dev PKI (the host share's) are the only ones trusted."""
        from pydstack.adapters.tdx.devpccs import dev_collateral

        loaded = pki if isinstance(pki, DevPki) else DevPki.load(pki)
        return cls(dev_collateral(loaded), root_ca_der=loaded.root_der)

    @property
    def simulated(self) -> bool:
        return self.root_ca_der is not None

    def describe(self) -> str:
        if self.simulated:
            return "RA-TLS verified, simulated (dev root from the host share)"
        return "RA-TLS verified (Intel root)"


def spki_of(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fingerprint(spki: bytes) -> str:
    return keccak256(spki).hex()[:16]


def check_root_pin(root_ca: x509.Certificate, pin: bytes) -> None:
    """Step 1: the root CA the KMS names must be the app-compose's key_provider_id."""
    spki = spki_of(root_ca)
    if spki != pin:
        raise KmsCheckFailed("root-pin", f"the KMS names root CA {fingerprint(spki)}…, the "
                             f"app-compose pins {fingerprint(pin)}… (key_provider_id)")  # fmt: skip


async def check_server(der: bytes, root_ca: x509.Certificate, trust: KmsTrust) -> RaTlsResult:
    """Steps 3-5 on the server's leaf certificate (TLS already verified the chain, step 2)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        usage = special_usage(cert)
    except (ValueError, TdxError) as e:
        raise KmsCheckFailed(KMS_RPC_USAGE, f"the server certificate does not parse: {e}") from None
    if usage != KMS_RPC_USAGE:
        raise KmsCheckFailed(KMS_RPC_USAGE, f"the server certificate's special usage is "
                             f"{usage!r}, not {KMS_RPC_USAGE!r}: it is no KMS's")  # fmt: skip
    try:
        cert.verify_directly_issued_by(root_ca)
    except (ValueError, TypeError, InvalidSignature):
        raise KmsCheckFailed("issuer", "the server certificate is not signed by the KMS root "
                             "CA itself") from None  # fmt: skip
    result = await trust.verifier.verify_der(der)
    if not result.ok:
        raise KmsCheckFailed("ra-tls", "the server's attestation does not verify: "
                             + "; ".join(result.reasons))  # fmt: skip
    return result


def _hex(doc: Any, name: str) -> bytes:
    value = doc.get(name) if isinstance(doc, dict) else None
    try:
        return bytes.fromhex(str(value)) if value is not None else b""
    except ValueError:
        raise KmsCheckFailed("root-attestation", f"GetMeta {name} is not hex") from None


async def check_k256_root(
    meta: dict[str, Any], ca_spki: bytes, server: RaTlsResult, trust: KmsTrust, *, now: int
) -> bytes:
    """Step 6: the k256 root public key the CA of step 1 was created with (GetMeta's
    ``bootstrap_info``), attested by a TD of the same KMS app as the server's."""
    boot = meta.get("bootstrap_info")
    ca_pub, k256, raw = (_hex(boot, n) for n in ("ca_pubkey", "k256_pubkey", "attestation"))
    if ca_pub != ca_spki:
        which = f"{fingerprint(ca_pub)}…, not {fingerprint(ca_spki)}…"
        raise KmsCheckFailed("root-attestation", f"GetMeta's bootstrap_info is for another root CA "
                             f"({which})")  # fmt: skip
    if not k256 or _hex(meta, "k256_pubkey") != k256:
        raise KmsCheckFailed("root-attestation", "GetMeta names no k256 root, or two")
    if not raw:
        raise KmsCheckFailed("root-attestation", "the KMS root was created without attestation")
    try:
        att = decode_attestation(raw)
        coll = await trust.collateral(att.quote)
    except (AttestationDecodeError, TdxError) as e:
        raise KmsCheckFailed("root-attestation", f"bootstrap attestation: {e}") from None
    reasons, _status, quote, info = check_attestation(
        att, coll, now=now, policy=trust.policy, root_ca_der=trust.root_ca_der
    )
    bound = (kms_bootstrap_report_data(ca_pub, k256), report_data_for(KMS_ROOT_TAG, ca_pub + k256))
    if quote is not None and quote.report.report_data not in bound:
        reasons.append("its report_data does not bind ca_pubkey || k256_pubkey")
    mine, theirs = info, server.app_info
    if mine is None or theirs is None or (mine.app_id, mine.compose_hash) != (
        theirs.app_id, theirs.compose_hash
    ):  # fmt: skip
        reasons.append("it comes from another app than the KMS serving this request")
    if reasons:
        raise KmsCheckFailed("root-attestation", "the k256 root's bootstrap attestation: "
                             + "; ".join(reasons))  # fmt: skip
    return k256


def check_k256_signature(k256_key: bytes, signature: bytes, app_id: bytes, root: bytes) -> None:
    """Step 7: GetAppKey's signature over this app's key is the attested root's."""
    try:
        msg = KMS_ISSUED_PREFIX + b":" + app_id + k256_public(k256_key)
        signer = recover_k256(signature, keccak256(msg))
    except (KeyError_, ValueError, TypeError) as e:
        raise KmsCheckFailed("k256-signature", str(e)) from None
    if signer != root:
        raise KmsCheckFailed("k256-signature", f"the app key is signed by {signer.hex()[:16]}…, "
                             f"not the KMS root {root.hex()[:16]}…")  # fmt: skip
