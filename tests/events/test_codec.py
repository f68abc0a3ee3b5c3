"""Events round-trip through the envelope; tampering with any byte is detected."""

from __future__ import annotations

import os

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydstack.core.events import (
    EVENT_TYPES,
    CodecError,
    Envelope,
    SignatureError,
    Signer,
    VmRejected,
    decode_any,
    decode_body,
    encode_body,
    message_hash,
    open_envelope,
    seal,
    subject,
    tag_of,
    verify,
)
from pydstack.core.events.subjects import SubjectError, parse_subject

SIGNER = Signer.from_private_bytes("prop", bytes(range(32)))


def _seal(event: object, **kw: object) -> bytes:
    args: dict[str, object] = {
        "subject": "dstack.vm.v1",
        "event_id": "e1",
        "time_ns": 1,
        "correlation": "c",
    }
    args.update(kw)
    return seal(SIGNER, event, **args)  # type: ignore[arg-type]


def _fits_msgpack(value: object) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    if isinstance(value, dict):
        return all(_fits_msgpack(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_fits_msgpack(v) for v in value)
    return True


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.__name__)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_every_event_type_round_trips(event_type: type, data: st.DataObject) -> None:
    """Any instance of any event type comes back equal after seal -> verify -> decode."""
    event = data.draw(st.from_type(event_type))
    if not _fits_msgpack(msgspec.to_builtins(event)):
        with pytest.raises(CodecError, match="serialize ints"):
            _seal(event)
        return
    wire = _seal(event)
    env = verify(wire)
    assert env.type == tag_of(event_type)
    assert decode_body(env) == event
    assert decode_any(encode_body(event)) == event


def test_tags_are_unique_and_stable() -> None:
    """Tags identify types on the log: no two types share one."""
    tags = [tag_of(t) for t in EVENT_TYPES]
    assert len(tags) == len(set(tags))
    assert all(tag == t.__name__ for tag, t in zip(tags, EVENT_TYPES, strict=True))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_detected(data: st.DataObject) -> None:
    """Flipping one bit anywhere in a message makes it undecodable or its signature invalid."""
    wire = bytearray(_seal(VmRejected(vm_id="v1", reason="no room"), prev=b"\x01" * 32))
    i = data.draw(st.integers(0, len(wire) - 1))
    bit = data.draw(st.integers(0, 7))
    wire[i] ^= 1 << bit
    with pytest.raises((CodecError, SignatureError)):
        env = verify(bytes(wire))
        decode_body(env)  # a flip inside the body that still decodes fails the signature first


def test_signature_binds_the_key() -> None:
    """Replacing the key in the envelope with another actor's key fails verification."""
    wire = _seal(VmRejected(vm_id="v1", reason="x"))
    env = open_envelope(wire)
    other = Signer.from_private_bytes("other", os.urandom(32))
    forged_env = msgspec.structs.replace(env, key=other.public_key)
    forged = msgspec.msgpack.encode(forged_env) + wire[-64:]
    with pytest.raises(SignatureError, match="bad signature"):
        verify(forged)


def test_unknown_type_stays_opaque() -> None:
    """A tag this version does not know decodes to None, not an error (forward compatibility)."""
    env = open_envelope(_seal(VmRejected(vm_id="v1", reason="x")))
    future = msgspec.structs.replace(env, type="VmTeleported")
    assert decode_body(future) is None


def test_known_type_with_wrong_body_is_a_codec_error() -> None:
    env = open_envelope(_seal(VmRejected(vm_id="v1", reason="x")))
    bad = msgspec.structs.replace(env, body=msgspec.Raw(msgspec.msgpack.encode({"vm_id": 3})))
    with pytest.raises(CodecError, match="bad VmRejected body"):
        decode_body(bad)


@pytest.mark.parametrize("junk", [b"", b"\x00" * 64, b"not msgpack at all" * 5, os.urandom(300)])
def test_junk_is_a_codec_error(junk: bytes) -> None:
    with pytest.raises(CodecError):
        open_envelope(junk)


def test_hash_chain_links_on_exact_bytes() -> None:
    """`prev` of the next event is sha256 of the previous message's whole data."""
    first = _seal(VmRejected(vm_id="v1", reason="a"))
    second = _seal(VmRejected(vm_id="v1", reason="b"), prev=message_hash(first), event_id="e2")
    assert open_envelope(second).prev == message_hash(first)
    assert len(message_hash(first)) == 32


def test_envelope_is_frozen() -> None:
    env = open_envelope(_seal(VmRejected(vm_id="v1", reason="a")))
    assert isinstance(env, Envelope)
    with pytest.raises(AttributeError):
        env.id = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kind", "ident", "ok"),
    [("vm", "abc-1", True), ("vm", "a.b", False), ("vm", "*", False), ("nope", "x", False),
     ("app", "", False), ("host", "h:1_x", True)],
)  # fmt: skip
def test_subjects_validate_tokens(kind: str, ident: str, ok: bool) -> None:
    if ok:
        assert parse_subject(subject(kind, ident)) == (kind, ident)
    else:
        with pytest.raises(SubjectError):
            subject(kind, ident)
