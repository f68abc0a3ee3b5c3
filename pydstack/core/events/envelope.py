"""The envelope: who wrote what, when, why, after which event; signed and hash-chained.

Wire format of one NATS message (``data``)::

    msgpack(Envelope) || ed25519_signature (64 bytes)

The signature covers the exact envelope bytes, and the envelope carries the body as raw
msgpack bytes (``msgspec.Raw``), so hashing and verifying never re-encode anything: what was
signed is what is stored. ``prev`` is sha256 of the previous message's ``data`` on the same
subject (empty for the first), so each aggregate is a hash chain that a reader can check
without trusting the server.

Everything here is pure: keys, times and ids are passed in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Final

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.bindings import crypto_sign as _sodium_sign
from nacl.bindings import crypto_sign_open as _sodium_open
from nacl.exceptions import BadSignatureError

from ._base import Event, tag_of
from .catalogue import EVENT_TYPES, AnyEvent

SIG_LEN: Final = 64
HASH_LEN: Final = 32


class Envelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Metadata of one event plus its body as the exact bytes that were signed."""

    id: str  # unique; also the Nats-Msg-Id, so a retried append is stored once
    type: str  # tag of the body, readable without decoding it
    subject: str
    time_ns: int  # writer's clock, unix nanoseconds (the stream's own timestamp is authoritative)
    actor: str  # name of the writing actor
    key: bytes  # its Ed25519 public key (32 bytes)
    correlation: str  # the whole flow (e.g. one deploy)
    causation: str = ""  # id of the event or command that caused this one
    prev: bytes = b""  # sha256 of the previous message on this subject
    body: msgspec.Raw


class CodecError(ValueError):
    """Bytes that are not a well-formed pydstack message."""


class SignatureError(ValueError):
    """A message whose signature does not match its envelope and key."""


_envelope_encoder: Final = msgspec.msgpack.Encoder()
_envelope_decoder: Final = msgspec.msgpack.Decoder(Envelope)
_body_encoder: Final = msgspec.msgpack.Encoder()
_any_decoder: Final = msgspec.msgpack.Decoder(AnyEvent)
_decoders: Final = {tag_of(t): msgspec.msgpack.Decoder(t) for t in EVENT_TYPES}


@dataclass(frozen=True, slots=True)
class Signer:
    """An actor's name and signing key; the public key is cached because it goes in every event."""

    actor: str
    private_key: Ed25519PrivateKey
    public_key: bytes
    # libsodium's form of the same key (seed || public key). Ed25519 signatures are
    # deterministic, so libsodium and OpenSSL produce identical bytes; libsodium is ~30%
    # faster per signature, and signing is the largest cost of an append.
    sodium_key: bytes = field(default=b"", repr=False)

    @classmethod
    def from_private_bytes(cls, actor: str, seed: bytes) -> Signer:
        key = Ed25519PrivateKey.from_private_bytes(seed)
        pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(actor=actor, private_key=key, public_key=pub, sodium_key=seed + pub)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `data`."""
        if self.sodium_key:
            return _sodium_sign(data, self.sodium_key)[:SIG_LEN]
        return self.private_key.sign(data)


def encode_body(event: Event) -> bytes:
    try:
        return _body_encoder.encode(event)
    except OverflowError as exc:  # msgpack integers are 64-bit
        raise CodecError(f"{type(event).__name__}: {exc}") from None


def seal(
    signer: Signer,
    event: Event,
    *,
    subject: str,
    event_id: str,
    time_ns: int,
    correlation: str,
    causation: str = "",
    prev: bytes = b"",
) -> bytes:
    """Encode and sign one event; returns the message ``data`` to publish."""
    env = Envelope(
        id=event_id,
        type=tag_of(type(event)),
        subject=subject,
        time_ns=time_ns,
        actor=signer.actor,
        key=signer.public_key,
        correlation=correlation,
        causation=causation,
        prev=prev,
        body=msgspec.Raw(encode_body(event)),
    )
    raw = _envelope_encoder.encode(env)
    return raw + signer.sign(raw)


def message_hash(data: bytes) -> bytes:
    """The chain link to the message: what the next event on the subject puts in ``prev``."""
    return hashlib.sha256(data).digest()


def open_envelope(data: bytes) -> Envelope:
    """Decode the envelope without checking the signature (fast path for folds)."""
    if len(data) <= SIG_LEN:
        raise CodecError(f"message of {len(data)} bytes is too short to hold an envelope")
    try:
        return _envelope_decoder.decode(data[:-SIG_LEN])
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise CodecError(f"not a pydstack envelope: {exc}") from None


def verify(data: bytes) -> Envelope:
    """Decode the envelope and check its signature against the key it names."""
    env = open_envelope(data)
    if len(env.key) != 32:
        raise SignatureError(f"event {env.id}: public key has {len(env.key)} bytes, expected 32")
    try:
        # libsodium (via PyNaCl) verifies Ed25519 about twice as fast as OpenSSL here, which is
        # what an audit of the whole log spends its time on. Same RFC 8032 check.
        _sodium_open(data[-SIG_LEN:] + data[:-SIG_LEN], env.key)
    except BadSignatureError:
        raise SignatureError(f"event {env.id}: bad signature for key {env.key.hex()}") from None
    return env


def decode_body(env: Envelope) -> AnyEvent | None:
    """The typed body, or None for a tag this version does not know (kept opaque, not an error).

    Raises CodecError when a known tag's body does not match its schema.
    """
    decoder = _decoders.get(env.type)
    if decoder is None:
        return None
    try:
        event: AnyEvent = decoder.decode(env.body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise CodecError(f"event {env.id}: bad {env.type} body: {exc}") from None
    return event


def decode_any(body: bytes) -> AnyEvent:
    """Decode a body by its own tag (used by tests and tools that hold just a body)."""
    try:
        event: AnyEvent = _any_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise CodecError(f"bad event body: {exc}") from None
    return event
