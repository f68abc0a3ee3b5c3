"""What a fold receives: one decoded event plus the stream metadata folds need.

Folds never see raw bytes or envelopes: the reader (event store, read model, CLI replay)
turns each stored message into an ``Applied`` once, with :func:`applied`, and every fold
takes the same object. ``seq`` is the stream sequence, ``time_ns`` the time to record
(the stream's own timestamp when the reader has it, else the writer's envelope time).
"""

from __future__ import annotations

import msgspec

from pydstack.core.events import AnyEvent, decode_body, open_envelope
from pydstack.core.policy import Allowed, Gate


class Applied(msgspec.Struct, frozen=True):
    """One event as a fold sees it: ``Applied(seq, time_ns, event, id)``."""

    seq: int
    time_ns: int
    event: AnyEvent
    id: str = ""


def applied(seq: int, data: bytes, time_ns: int = 0) -> Applied | None:
    """Decode one stored message for the folds; None for an event type this version lacks.

    Raises ``CodecError`` for bytes that are not a pydstack message. The signature is not
    checked here (that is the auditor's job); ``time_ns=0`` means "use the envelope's time".
    """
    env = open_envelope(data)
    event = decode_body(env)
    if event is None:
        return None
    return Applied(seq, time_ns or env.time_ns, event, env.id)


def from_allowed(ok: Allowed, seq: int, time_ns: int = 0) -> Applied | None:
    """The fold input of an allowed message (None for a type this version lacks)."""
    if ok.event is None:
        return None
    return Applied(seq, time_ns or ok.envelope.time_ns, ok.event, ok.envelope.id)


def admit(gate: Gate, seq: int, subject: str, data: bytes, time_ns: int = 0) -> Applied | None:
    """Like :func:`applied`, through the write policy: the signature verified, the signer
    allowed to write it (``gate.judge``, which also folds the keyring); None when refused."""
    v = gate.judge(seq, subject, data)
    return from_allowed(v, seq, time_ns) if isinstance(v, Allowed) else None
