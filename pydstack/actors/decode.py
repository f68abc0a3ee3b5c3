"""Turn one stored message into a verified, typed event, or say precisely why it is not one.

Actors see untrusted bytes: anyone allowed to publish on the stream can put garbage on a
subject. :func:`decode_message` never raises anything but :class:`Malformed`, whose ``reason``
is a short label fit for a metric (``not_msgpack``, ``not_envelope``, ``bad_signature``,
``subject_mismatch``, ``unknown_type``, ``bad_body``).
"""

from __future__ import annotations

from typing import Final

import msgspec

from pydstack.core.events import (
    AnyEvent,
    CodecError,
    Envelope,
    SignatureError,
    decode_body,
    open_envelope,
    verify,
)

REASONS: Final = (
    "not_msgpack", "not_envelope", "bad_signature", "subject_mismatch", "unknown_type", "bad_body",
)  # fmt: skip
_SIG_LEN: Final = 64


class Malformed(ValueError):
    """A message that is not a valid pydstack event; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _is_msgpack(data: bytes) -> bool:
    for candidate in (data, data[:-_SIG_LEN]):
        try:
            msgspec.msgpack.decode(candidate)
            return True
        except (msgspec.DecodeError, ValueError):
            continue
    return False


def decode_message(
    subject: str, data: bytes, *, check_signature: bool = True
) -> tuple[Envelope, AnyEvent]:
    """The envelope and typed body of a message stored on ``subject``; raises Malformed."""
    try:
        env = verify(data) if check_signature else open_envelope(data)
    except SignatureError as exc:
        raise Malformed("bad_signature", str(exc)) from None
    except CodecError as exc:
        reason = "not_envelope" if _is_msgpack(data) else "not_msgpack"
        raise Malformed(reason, str(exc)) from None
    if env.subject != subject:
        raise Malformed(
            "subject_mismatch", f"event {env.id} names {env.subject}, stored on {subject}"
        )
    try:
        event = decode_body(env)
    except CodecError as exc:
        raise Malformed("bad_body", str(exc)) from None
    if event is None:
        raise Malformed("unknown_type", f"event {env.id} has type {env.type!r}, unknown here")
    return env, event
