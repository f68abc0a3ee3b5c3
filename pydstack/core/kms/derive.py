"""dstack-compatible key derivation from the KMS root keys. Pure: no I/O, no clock.

Rules (dstack `ra-tls/src/kdf.rs`, `kms/src/crypto.rs`, `kms/src/main_service.rs`):

- ``hkdf(ikm, ctx)``: HKDF-SHA256, salt ``b"RATLS"``, info = the context parts concatenated;
- a derived P-256 key: the 32 HKDF bytes *are* the scalar (refused when 0 or >= n);
- ``dh_secret(root_ca, ctx)``: ``sha256(PKCS#8 DER of the derived P-256 key)`` — the DER
  carries the public key and no curve parameters inside the ECPrivateKey;
- disk key = ``dh_secret(root_ca, [app_id, instance_id, "app-disk-crypt-key"])``;
- env key (X25519 secret, used unclamped as raw bytes) =
  ``dh_secret(root_ca, [app_id, "env-encrypt-key"])``;
- app k256 key = ``hkdf(root_k256, [app_id, "app-key"])``, and the root signs
  ``keccak256("dstack-kms-issued:" || app_id || compressed app pubkey)`` (65 bytes, r||s||v);
- app CA key = derived P-256 of ``[app_id, "app-ca"]`` from the root CA key;
- env public key signatures: legacy ``keccak256("dstack-env-encrypt-pubkey:" || app_id ||
  pubkey)`` and v1 ``keccak256("dstack-env-encrypt-pubkey:" || app_id || be64(ts) || pubkey)``.

    root = RootKeys(ca_scalar=..., k256=...)
    keys = app_key_material(root, app_id, instance_id)
"""

from __future__ import annotations

import hashlib

import coincurve
import msgspec
from Crypto.Hash import keccak
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KDF_SALT = b"RATLS"
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ENV_PUBKEY_PREFIX = b"dstack-env-encrypt-pubkey"
KMS_ISSUED_PREFIX = b"dstack-kms-issued"
TEMP_CA_CONTEXT = b"pydstack-temp-ca"  # ours: the temp CA key follows from the root CA key


class DerivationError(ValueError):
    """A derivation input is unusable (wrong length, scalar out of range)."""


class RootKeys(msgspec.Struct, frozen=True):
    """The cluster's private root material: the TLS CA scalar (P-256) and the k256 key."""

    ca_scalar: int
    k256: bytes

    def ca_key(self) -> ec.EllipticCurvePrivateKey:
        return ec.derive_private_key(self.ca_scalar, ec.SECP256R1())

    def k256_public(self) -> bytes:
        return k256_public(self.k256)

    def ca_public_der(self) -> bytes:
        return spki_der(self.ca_key().public_key())


class AppKeyMaterial(msgspec.Struct, frozen=True):
    """What GetAppKey hands an app (besides the CA certificate and gateway app id)."""

    disk_crypt_key: bytes
    env_crypt_key: bytes
    k256_key: bytes
    k256_signature: bytes


def keccak256(data: bytes) -> bytes:
    return keccak.new(digest_bits=256, data=data).digest()


def hkdf(ikm: bytes, context: list[bytes], size: int = 32) -> bytes:
    """dstack `kdf::derive_key`."""
    return HKDF(hashes.SHA256(), size, KDF_SALT, b"".join(context)).derive(ikm)


def p256_scalar(ikm: bytes, context: list[bytes]) -> int:
    """dstack `derive_p256_key_pair_from_bytes`: the HKDF output as a P-256 scalar."""
    scalar = int.from_bytes(hkdf(ikm, context), "big")
    if not 0 < scalar < P256_N:
        raise DerivationError("derived P-256 scalar is out of range")
    return scalar


def p256_key(scalar: int) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(scalar, ec.SECP256R1())


def derive_p256(parent_scalar: int, context: list[bytes]) -> int:
    """dstack `derive_p256_key_pair`: HKDF of the parent's 32-byte big-endian scalar."""
    return p256_scalar(parent_scalar.to_bytes(32, "big"), context)


def pkcs8_der(scalar: int) -> bytes:
    """Canonical PKCS#8 DER of a P-256 key (what the p256 crate writes)."""
    return p256_key(scalar).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def dh_secret(root_ca_scalar: int, context: list[bytes]) -> bytes:
    """dstack `kdf::derive_dh_secret`."""
    return hashlib.sha256(pkcs8_der(derive_p256(root_ca_scalar, context))).digest()


def spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def k256_public(secret: bytes) -> bytes:
    """Compressed SEC1 public key of a secp256k1 secret."""
    return bytes(coincurve.PrivateKey(secret).public_key.format(compressed=True))


def sign_recoverable(secret: bytes, digest32: bytes) -> bytes:
    """k256 `sign_digest_recoverable`: RFC 6979, low-s, 65 bytes ``r || s || recid``."""
    return bytes(coincurve.PrivateKey(secret).sign_recoverable(digest32, hasher=None))


def recover_signer(signature65: bytes, digest32: bytes) -> bytes:
    """Compressed public key that made `signature65`; DerivationError when none."""
    try:
        pub = coincurve.PublicKey.from_signature_and_message(signature65, digest32, hasher=None)
    except (ValueError, TypeError) as e:
        raise DerivationError(f"signature does not recover a key: {e}") from None
    return bytes(pub.format(compressed=True))


def sign_message(key: bytes, prefix: bytes, app_id: bytes, message: bytes) -> bytes:
    """dstack `crypto::sign_message`."""
    return sign_recoverable(key, keccak256(prefix + b":" + app_id + message))


def sign_message_with_timestamp(
    key: bytes, prefix: bytes, app_id: bytes, timestamp: int, message: bytes
) -> bytes:
    """dstack `crypto::sign_message_with_timestamp` (timestamp as 8 bytes big endian)."""
    return sign_recoverable(
        key, keccak256(prefix + b":" + app_id + timestamp.to_bytes(8, "big") + message)
    )


def check_app_id(app_id: bytes) -> None:
    if len(app_id) != 20:
        raise DerivationError(f"app_id must be 20 bytes, got {len(app_id)}")


def derive_k256_app_key(root_k256: bytes, app_id: bytes) -> tuple[bytes, bytes]:
    """(app k256 key, root signature over it): dstack `crypto::derive_k256_key`."""
    app_key = hkdf(root_k256, [app_id, b"app-key"])
    if not 0 < int.from_bytes(app_key, "big") < coincurve.utils.GROUP_ORDER_INT:
        raise DerivationError("derived k256 scalar is out of range")
    return app_key, sign_message(root_k256, KMS_ISSUED_PREFIX, app_id, k256_public(app_key))


def env_crypt_key(root: RootKeys, app_id: bytes) -> bytes:
    return dh_secret(root.ca_scalar, [app_id, b"env-encrypt-key"])


def disk_crypt_key(root: RootKeys, app_id: bytes, instance_id: bytes) -> bytes:
    return dh_secret(root.ca_scalar, [app_id, instance_id, b"app-disk-crypt-key"])


def x25519_public(secret: bytes) -> bytes:
    return x25519.X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()


class PerAppKeys(msgspec.Struct, frozen=True):
    """The part of GetAppKey's material that depends on the app only (not the instance):
    the same for every instance of an app, so a KMS may keep it between requests."""

    env_crypt_key: bytes
    k256_key: bytes
    k256_signature: bytes


def per_app_keys(root: RootKeys, app_id: bytes) -> PerAppKeys:
    check_app_id(app_id)
    k256_key, k256_sig = derive_k256_app_key(root.k256, app_id)
    return PerAppKeys(
        env_crypt_key=env_crypt_key(root, app_id), k256_key=k256_key, k256_signature=k256_sig
    )


def app_key_material(
    root: RootKeys, app_id: bytes, instance_id: bytes, per_app: PerAppKeys | None = None
) -> AppKeyMaterial:
    """Everything GetAppKey derives for one (app, instance); identical on every replica.
    ``per_app``: `per_app_keys(root, app_id)` computed earlier (it is deterministic)."""
    check_app_id(app_id)
    app = per_app or per_app_keys(root, app_id)
    return AppKeyMaterial(
        disk_crypt_key=disk_crypt_key(root, app_id, instance_id),
        env_crypt_key=app.env_crypt_key,
        k256_key=app.k256_key,
        k256_signature=app.k256_signature,
    )


class EnvPubKey(msgspec.Struct, frozen=True):
    """GetAppEnvEncryptPubKey's answer (bytes; hex on the wire)."""

    public_key: bytes
    signature: bytes
    timestamp: int
    signature_v1: bytes


def env_public_key(root: RootKeys, app_id: bytes, timestamp: int) -> EnvPubKey:
    check_app_id(app_id)
    pub = x25519_public(env_crypt_key(root, app_id))
    return EnvPubKey(
        public_key=pub,
        signature=sign_message(root.k256, ENV_PUBKEY_PREFIX, app_id, pub),
        timestamp=timestamp,
        signature_v1=sign_message_with_timestamp(
            root.k256, ENV_PUBKEY_PREFIX, app_id, timestamp, pub
        ),
    )


def env_pubkey_signer(resp: EnvPubKey, app_id: bytes) -> bytes:
    """The root k256 public key that signed `resp` (v1 form); DerivationError if it fails."""
    digest = keccak256(
        ENV_PUBKEY_PREFIX + b":" + app_id + resp.timestamp.to_bytes(8, "big") + resp.public_key
    )
    return recover_signer(resp.signature_v1, digest)


def app_ca_scalar(root: RootKeys, app_id: bytes) -> int:
    return derive_p256(root.ca_scalar, [app_id, b"app-ca"])


def temp_ca_scalar(root: RootKeys) -> int:
    return derive_p256(root.ca_scalar, [TEMP_CA_CONTEXT])
