"""Known answers for the derivation, computed independently of pydstack.core.kms.derive."""

from __future__ import annotations

import hashlib
import hmac
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from dstack_sdk.verify_env_encrypt_public_key import verify_env_encrypt_public_key
from eth_keys import keys as eth
from eth_utils import keccak

from pydstack.core.kms import RootKeys, app_key_material, dh_secret, env_public_key
from pydstack.core.kms.derive import per_app_keys, x25519_public

# dstack ra-tls/src/kdf.rs `test_derive_dh_secret_stable_output`: root key, context, secret.
DSTACK_ROOT_DER = bytes.fromhex(
    "308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b02"
    "01010420f57527cea4ab7ffb49af99b158cdc0e3ec06398f528349ea236b7d2a"
    "fe19cec1a1440342000491f50522407ce29dce3ed7d31a15d80c1c42f13a2355"
    "2d2b33a0ce09ee11e47bce95936f3e7f80d195f879e28e1b144ef37ac9ab8e36"
    "a690cbf930b775897b27"
)
DSTACK_SECRET = "663afd58820be8ad645f9c035e93199d114ab16f738db62393bc1d7d623e8813"


def _hkdf(ikm: bytes, info: bytes) -> bytes:
    """RFC 5869 with SHA-256, salt "RATLS", 32 bytes, from the hmac module alone."""
    prk = hmac.new(b"RATLS", ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def _root() -> RootKeys:
    key = serialization.load_der_private_key(DSTACK_ROOT_DER, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return RootKeys(ca_scalar=key.private_numbers().private_value, k256=b"\x07" * 32)


def test_dh_secret_matches_dstack_vector() -> None:
    """dstack's pinned derive_dh_secret output for its fixed root key and two-part context."""
    assert dh_secret(_root().ca_scalar, [b"context one", b"context two"]).hex() == DSTACK_SECRET


def test_app_keys_match_an_independent_computation() -> None:
    """Disk/env keys (HKDF -> P-256 -> PKCS#8 -> sha256), k256 key and root signature."""
    root = _root()
    app_id, instance_id = bytes(range(20)), bytes(range(100, 120))
    got = app_key_material(root, app_id, instance_id)

    def dh(info: bytes) -> bytes:
        sk_bytes = root.ca_scalar.to_bytes(32, "big")
        scalar = int.from_bytes(_hkdf(sk_bytes, info), "big")
        der = ec.derive_private_key(scalar, ec.SECP256R1()).private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return hashlib.sha256(der).digest()

    assert got.disk_crypt_key == dh(app_id + instance_id + b"app-disk-crypt-key")
    assert got.env_crypt_key == dh(app_id + b"env-encrypt-key")
    app_key = _hkdf(root.k256, app_id + b"app-key")
    assert got.k256_key == app_key
    pub = eth.PrivateKey(app_key).public_key.to_compressed_bytes()
    digest = keccak(b"dstack-kms-issued:" + app_id + pub)
    signer = eth.Signature(got.k256_signature).recover_public_key_from_msg_hash(digest)
    assert signer == eth.PrivateKey(root.k256).public_key
    # RFC 6979: the signature is deterministic, so every replica returns the same bytes.
    assert app_key_material(root, app_id, instance_id) == got


def test_env_pubkey_signature_is_accepted_by_dstack_sdk() -> None:
    """dstack-sdk recovers the KMS root key from the timestamped signature (and only then)."""
    root = _root()
    app_id = bytes(range(20))
    now = int(time.time())
    resp = env_public_key(root, app_id, now)
    assert resp.public_key == x25519_public(app_key_material(root, app_id, b"").env_crypt_key)
    signer = verify_env_encrypt_public_key(resp.public_key, resp.signature_v1, app_id.hex(), now)
    assert signer == "0x" + root.k256_public().hex()
    stale = env_public_key(root, app_id, now - 3600)
    assert (
        verify_env_encrypt_public_key(
            stale.public_key, stale.signature_v1, app_id.hex(), stale.timestamp
        )
        is None
    )


def test_per_app_keys_given_or_derived_give_the_same_material() -> None:
    """The per-app part a KMS keeps between requests is the same for every instance, and
    passing it in changes nothing but the work done; another app's part is another key."""
    root = _root()
    app_id, other = bytes(range(20)), bytes(range(1, 21))
    kept = per_app_keys(root, app_id)
    for instance_id in (bytes(20), bytes(range(100, 120))):
        fresh = app_key_material(root, app_id, instance_id)
        assert app_key_material(root, app_id, instance_id, kept) == fresh
        assert (fresh.env_crypt_key, fresh.k256_key, fresh.k256_signature) == (
            kept.env_crypt_key, kept.k256_key, kept.k256_signature)  # fmt: skip
    assert per_app_keys(root, other).k256_key != kept.k256_key
