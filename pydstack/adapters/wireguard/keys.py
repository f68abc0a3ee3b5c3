"""WireGuard keys: X25519 keypairs, base64 as `wg` prints them, hex as UAPI wants them.

Usage::

    key = PrivateKey.generate()
    key.public_key().b64        # 'xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg='
    key.hex                     # what `private_key=` takes on the UAPI socket
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from .errors import KeyFormatError

KEY_LEN = 32


def _decode_b64(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFormatError(f"key {text!r} is not base64: {exc}") from exc
    if len(raw) != KEY_LEN:
        raise KeyFormatError(f"key {text!r} decodes to {len(raw)} bytes, want {KEY_LEN}")
    return raw


def _decode_hex(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise KeyFormatError(f"key {text!r} is not hex: {exc}") from exc
    if len(raw) != KEY_LEN:
        raise KeyFormatError(f"key {text!r} decodes to {len(raw)} bytes, want {KEY_LEN}")
    return raw


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A Curve25519 public key (also used for preshared keys' 32-byte format checks)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise KeyFormatError(f"public key has {len(self.raw)} bytes, want {KEY_LEN}")

    @classmethod
    def from_b64(cls, text: str) -> PublicKey:
        return cls(_decode_b64(text))

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        return cls(_decode_hex(text))

    @property
    def b64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    @property
    def hex(self) -> str:
        return self.raw.hex()

    def __str__(self) -> str:
        return self.b64


@dataclass(frozen=True, slots=True, repr=False)
class PrivateKey:
    """A Curve25519 private key, clamped the way `wg genkey` clamps it."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise KeyFormatError(f"private key has {len(self.raw)} bytes, want {KEY_LEN}")

    def __repr__(self) -> str:  # never print key material
        return f"PrivateKey(public={self.public_key().b64})"

    @classmethod
    def generate(cls) -> PrivateKey:
        raw = X25519PrivateKey.generate().private_bytes(
            Encoding.Raw, PrivateFormat.Raw, encryption_algorithm=NoEncryption()
        )
        return cls(_clamp(raw))

    @classmethod
    def from_b64(cls, text: str) -> PrivateKey:
        return cls(_decode_b64(text))

    @classmethod
    def from_hex(cls, text: str) -> PrivateKey:
        return cls(_decode_hex(text))

    @property
    def b64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    @property
    def hex(self) -> str:
        return self.raw.hex()

    def public_key(self) -> PublicKey:
        pub = X25519PrivateKey.from_private_bytes(self.raw).public_key()
        return PublicKey(pub.public_bytes(Encoding.Raw, PublicFormat.Raw))


def _clamp(raw: bytes) -> bytes:
    # X25519 clamps on use anyway; clamping at rest makes keys byte-identical to `wg genkey`.
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def b64_to_hex(text: str) -> str:
    """A base64 key (wg format) as lowercase hex (UAPI format)."""
    return _decode_b64(text).hex()


def hex_to_b64(text: str) -> str:
    """A hex key (UAPI format) as base64 (wg format)."""
    return base64.b64encode(_decode_hex(text)).decode("ascii")
