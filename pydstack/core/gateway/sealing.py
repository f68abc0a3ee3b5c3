"""Seal private keys to a gateway cluster so that only its nodes can open them. Pure.

The ACME account key and every certificate key travel on the log, so every gateway node
serves the same certificate without a side channel, but only sealed:

- Each cluster has an X25519 key pair, the **cluster key**. Every gateway node holds the
  private half; writers need only the public half.
- ``seal``: a fresh ephemeral X25519 key, ECDH with the cluster's public key, HKDF-SHA256
  (salt = ephemeral public || cluster public, info = ``INFO``) to an AES-256-GCM key.
- The associated data (:func:`binding`) names what the secret is, the cluster, the domain or
  ACME directory it belongs to and the **id of the event it travels in**, so a sealed blob
  copied into another event, domain or cluster does not open.
- Blob: ``0x01 || key id (8) || ephemeral public (32) || nonce (12) || ciphertext+tag``; the
  key id (first 8 bytes of sha256 of the cluster public key) lets a node with the wrong key
  say so instead of reporting a bad tag.

Where the private half comes from (``ClusterKey.derive(secret, cluster)``): the secret is
32+ bytes of key material. Today it is a cluster secret file written once
(``adapters.acme.keys.create_cluster_secret``) and copied to each node at setup. In a TEE
deployment the gateway is an app, and each gateway CVM asks the KMS for an app key (the guest
agent's ``GetKey`` with path ``pydstack/gateway-seal``): every instance of the gateway app gets
the same bytes, no file is copied and no operator sees the key; the derivation below stays the
same, only the input changes. Usage::

    key = ClusterKey.derive(secret, "default")
    ad = binding("certificate-key", "default", "example.com", event_id)
    blob = seal(key.public, pem, ad, ephemeral=os.urandom(32), nonce=os.urandom(12))
    assert open_sealed(key, blob, ad) == pem
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION: Final = 1
INFO: Final = b"pydstack gateway seal v1"
_DERIVE_INFO: Final = b"pydstack gateway cluster key v1|"
_KEY_ID_LEN: Final = 8
_HEADER: Final = 1 + _KEY_ID_LEN + 32 + 12
MIN_SECRET: Final = 32


class SealError(ValueError):
    """A sealed blob that does not open with this key and binding (one line, why)."""


def _raw_public(key: x25519.X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: bytes) -> bytes:
    return hashlib.sha256(public).digest()[:_KEY_ID_LEN]


@dataclass(frozen=True, slots=True)
class ClusterKey:
    """The private half of a cluster key (32 raw X25519 bytes); its repr shows no secret."""

    private: bytes = field(repr=False)
    public: bytes = field(init=False)

    def __post_init__(self) -> None:
        if len(self.private) != 32:
            raise ValueError("a cluster key is 32 bytes")
        pub = _raw_public(x25519.X25519PrivateKey.from_private_bytes(self.private).public_key())
        object.__setattr__(self, "public", pub)

    @classmethod
    def derive(cls, secret: bytes, cluster: str) -> ClusterKey:
        """The cluster key that ``secret`` (a secret file's bytes or KMS key material) gives
        ``cluster``; one secret may serve several clusters without sharing a key."""
        if len(secret) < MIN_SECRET:
            raise ValueError(f"a cluster secret needs at least {MIN_SECRET} bytes")
        hkdf = HKDF(hashes.SHA256(), 32, salt=None, info=_DERIVE_INFO + cluster.encode())
        return cls(hkdf.derive(secret))

    @property
    def key_id(self) -> str:
        return key_id(self.public).hex()


def binding(purpose: str, cluster: str, name: str, event_id: str) -> bytes:
    """The associated data of one sealed secret: what it is, whose, and which event holds it."""
    for part in (purpose, cluster, name, event_id):
        if "\n" in part:
            raise ValueError("binding parts are single lines")
    return f"pydstack-seal-v1\n{purpose}\n{cluster}\n{name}\n{event_id}".encode()


def _aead_key(shared: bytes, eph_pub: bytes, recipient: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=eph_pub + recipient, info=INFO).derive(shared)


def seal(recipient: bytes, plaintext: bytes, ad: bytes, *, ephemeral: bytes, nonce: bytes) -> bytes:
    """Seal ``plaintext`` to the cluster public key ``recipient``. ``ephemeral`` (32 bytes)
    and ``nonce`` (12 bytes) must be fresh random bytes: the caller passes them in."""
    if len(ephemeral) != 32 or len(nonce) != 12:
        raise ValueError("seal needs a 32-byte ephemeral key and a 12-byte nonce")
    eph = x25519.X25519PrivateKey.from_private_bytes(ephemeral)
    eph_pub = _raw_public(eph.public_key())
    shared = eph.exchange(x25519.X25519PublicKey.from_public_bytes(recipient))
    ct = AESGCM(_aead_key(shared, eph_pub, recipient)).encrypt(nonce, plaintext, ad)
    return bytes([VERSION]) + key_id(recipient) + eph_pub + nonce + ct


def open_sealed(key: ClusterKey, blob: bytes, ad: bytes) -> bytes:
    """The plaintext of a blob sealed to ``key`` with associated data ``ad``; SealError else."""
    if len(blob) < _HEADER + 16 or blob[0] != VERSION:
        raise SealError("not a sealed blob of version 1")
    kid = blob[1 : 1 + _KEY_ID_LEN]
    if kid != key_id(key.public):
        raise SealError(
            f"sealed for cluster key {kid.hex()}, this node holds {key.key_id}: "
            "check the node's cluster secret"
        )
    eph_pub = blob[1 + _KEY_ID_LEN : 1 + _KEY_ID_LEN + 32]
    nonce = blob[_HEADER - 12 : _HEADER]
    priv = x25519.X25519PrivateKey.from_private_bytes(key.private)
    try:
        shared = priv.exchange(x25519.X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError:  # a low-order point: nobody sealed this with our scheme
        raise SealError("sealed blob has an invalid ephemeral key") from None
    try:
        return AESGCM(_aead_key(shared, eph_pub, key.public)).decrypt(nonce, blob[_HEADER:], ad)
    except InvalidTag:
        raise SealError("sealed blob does not open: altered, or moved to another event") from None
