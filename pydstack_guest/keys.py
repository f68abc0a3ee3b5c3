"""App keys and dstack's key rules: derivation, signature chains, Sign/Verify algorithms.

Rules (dstack `ra-tls/src/kdf.rs`, `kms/src/crypto.rs`, guest-agent `rpc_service.rs`):

- derive: HKDF-SHA256, salt `b"RATLS"`, IKM = app k256 key, info = concatenated context;
- GetKey(path, purpose, algorithm): key = derive(app_key, [path]); the app key signs
  `keccak256(f"{purpose}:{hex(pubkey)}")` (pubkey: compressed SEC1 for secp256k1, raw 32
  bytes for ed25519) as a 65-byte recoverable signature `r || s || recid`; the chain is
  `[that signature, k256_signature]` where `k256_signature` is the KMS root's signature over
  `keccak256(b"dstack-kms-issued:" || app_id || compressed app pubkey)`;
- Sign uses the GetKey key of path `vms`, purpose `signing`;
- algorithms: `secp256k1` (alias `k256`, default), `ed25519`, and for Sign/Verify also
  `secp256k1_prehashed` (32-byte digest); anything else is refused.

Pure functions; the key provider file I/O is in `provider.py`.
"""

from __future__ import annotations

import hashlib

import coincurve
from coincurve.ecdsa import cdata_to_der, deserialize_compact
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pydstack.adapters.tdx.identity import keccak256

KDF_SALT = b"RATLS"
KMS_ISSUED_PREFIX = b"dstack-kms-issued"
SIGN_PATH = "vms"
SIGN_PURPOSE = "signing"
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class KeyError_(ValueError):
    """A key request is invalid; `field` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def normalize_algorithm(algorithm: str) -> str:
    return "secp256k1" if algorithm in ("k256", "") else algorithm


def derive_key(ikm: bytes, context: list[bytes], size: int = 32) -> bytes:
    """dstack `kdf::derive_key`: HKDF-SHA256 with salt "RATLS" and the joined context."""
    return HKDF(hashes.SHA256(), size, KDF_SALT, b"".join(context)).derive(ikm)


def k256_public(secret: bytes) -> bytes:
    """Compressed SEC1 public key (what k256's `to_sec1_bytes` gives)."""
    return bytes(coincurve.PrivateKey(secret).public_key.format(compressed=True))


def sign_recoverable(secret: bytes, digest32: bytes) -> bytes:
    """65 bytes `r || s || recid`, low-s, RFC 6979: k256's `sign_digest_recoverable`."""
    return bytes(coincurve.PrivateKey(secret).sign_recoverable(digest32, hasher=None))


def recover_k256(signature65: bytes, digest32: bytes) -> bytes:
    """Compressed public key that made `signature65` over `digest32`."""
    try:
        pub = coincurve.PublicKey.from_signature_and_message(signature65, digest32, hasher=None)
    except (ValueError, TypeError) as e:
        raise KeyError_("signature", f"signature does not recover a key: {e}") from None
    return bytes(pub.format(compressed=True))


def kms_issue_app_key(root_secret: bytes, app_id: bytes) -> tuple[bytes, bytes]:
    """What a KMS gives an app: (app k256 key, root signature over its public key)."""
    app_key = derive_key(root_secret, [app_id, b"app-key"])
    msg = KMS_ISSUED_PREFIX + b":" + app_id + k256_public(app_key)
    return app_key, sign_recoverable(root_secret, keccak256(msg))


def get_key(
    app_key: bytes, k256_signature: bytes, path: str, purpose: str, algorithm: str
) -> tuple[bytes, list[bytes]]:
    """GetKey: (derived 32-byte key, signature chain)."""
    algo = normalize_algorithm(algorithm)
    derived = derive_key(app_key, [path.encode()])
    if algo == "ed25519":
        pub = ed25519.Ed25519PrivateKey.from_private_bytes(derived).public_key().public_bytes_raw()
    elif algo == "secp256k1":
        pub = k256_public(derived)
    else:
        raise KeyError_("algorithm", f"Unsupported algorithm {algorithm!r}")
    sig = sign_recoverable(app_key, keccak256(f"{purpose}:{pub.hex()}".encode()))
    return derived, [sig, k256_signature]


def key_public(derived: bytes, algorithm: str) -> bytes:
    algo = normalize_algorithm(algorithm)
    if algo == "ed25519":
        return ed25519.Ed25519PrivateKey.from_private_bytes(derived).public_key().public_bytes_raw()
    return k256_public(derived)


def verify_key_chain(
    derived_public: bytes,
    purpose: str,
    chain: list[bytes],
    app_id: bytes,
    kms_root_public: bytes,
) -> list[str]:
    """Check a GetKey signature chain up to the KMS root; empty list when it holds."""
    if len(chain) != 2:
        return [f"signature chain has {len(chain)} entries, want 2"]
    try:
        app_pub = recover_k256(chain[0], keccak256(f"{purpose}:{derived_public.hex()}".encode()))
        root = recover_k256(chain[1], keccak256(KMS_ISSUED_PREFIX + b":" + app_id + app_pub))
    except KeyError_ as e:
        return [str(e)]
    if root != kms_root_public:
        return [f"chain ends at {root.hex()}, not the KMS root {kms_root_public.hex()}"]
    return []


def sign(
    app_key: bytes, k256_signature: bytes, algorithm: str, data: bytes
) -> dict[str, bytes | list[bytes]]:
    """Sign: signature, its chain (signature, key sig, KMS sig) and the public key."""
    algo = normalize_algorithm(algorithm)
    if algo not in ("ed25519", "secp256k1", "secp256k1_prehashed"):
        raise KeyError_("algorithm", f"Unsupported algorithm {algorithm!r}")
    key_algo = "secp256k1" if algo == "secp256k1_prehashed" else algo
    derived, chain = get_key(app_key, k256_signature, SIGN_PATH, SIGN_PURPOSE, key_algo)
    if algo == "ed25519":
        sk = ed25519.Ed25519PrivateKey.from_private_bytes(derived)
        signature = sk.sign(data)
    elif algo == "secp256k1":
        # k256's Signer hashes with SHA-256; both use RFC 6979, so signatures match dstack's.
        signature = sign_recoverable(derived, hashlib.sha256(data).digest())[:64]
    else:
        if len(data) != 32:
            raise KeyError_(
                "data", f"Pre-hashed signing requires a 32-byte digest, got {len(data)} bytes"
            )
        signature = sign_recoverable(derived, data)[:64]
    return {
        "signature": signature,
        "signature_chain": [signature, chain[0], chain[1]],
        "public_key": key_public(derived, key_algo),
    }


def verify(algorithm: str, data: bytes, signature: bytes, public_key: bytes) -> bool:
    """Verify like dstack: malformed keys/signatures are errors, wrong signatures are False."""
    algo = normalize_algorithm(algorithm)
    if algo == "ed25519":
        if len(public_key) != 32:
            raise KeyError_("public_key", "ed25519 public key must be 32 bytes")
        if len(signature) != 64:
            raise KeyError_("signature", "ed25519 signature must be 64 bytes")
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
        except InvalidSignature:
            return False
        except ValueError as e:
            raise KeyError_("public_key", f"invalid ed25519 public key: {e}") from None
        return True
    if algo not in ("secp256k1", "secp256k1_prehashed"):
        raise KeyError_("algorithm", f"Unsupported algorithm {algorithm!r}")
    try:
        pub = coincurve.PublicKey(public_key)
    except (ValueError, TypeError) as e:
        raise KeyError_("public_key", f"invalid secp256k1 public key: {e}") from None
    if len(signature) != 64 or signature[:32] == bytes(32) or signature[32:] == bytes(32):
        raise KeyError_("signature", "secp256k1 signature must be 64 bytes r || s, both nonzero")
    der = cdata_to_der(deserialize_compact(signature))
    if algo == "secp256k1_prehashed":
        if len(data) != 32:
            raise KeyError_("data", "prehashed verification needs a 32-byte digest")
        # libsecp256k1 refuses high-s signatures, as k256 does.
        return bool(pub.verify(der, data, hasher=None))
    return bool(pub.verify(der, data))


def p256_from_seed(seed: bytes, context: list[bytes]) -> ec.EllipticCurvePrivateKey:
    """dstack `derive_p256_key_pair_from_bytes`: HKDF the seed, use it as the P-256 scalar."""
    scalar = int.from_bytes(derive_key(seed, context), "big")
    if not 0 < scalar < _P256_N:
        raise KeyError_("path", "derived P-256 scalar is out of range; use another path")
    return ec.derive_private_key(scalar, ec.SECP256R1())
