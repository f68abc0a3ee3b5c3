"""Property tests: tampering breaks replay with a reason; parsers raise only our typed error."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from pydstack.adapters.tdx.attestation import decode_attestation
from pydstack.adapters.tdx.ccel import parse_ccel
from pydstack.adapters.tdx.eventlog import (
    EventLogError,
    parse_json_event_log,
    replay_and_compare,
)
from pydstack.adapters.tdx.quote import parse_quote

VECTORS = Path(__file__).parent.parent / "vectors" / "dstack"
_ATT = decode_attestation((VECTORS / "attestation.bin").read_bytes())
_RTMRS = parse_quote(_ATT.quote).report.rtmrs
_EVENTS = list(_ATT.event_log)
_RUNTIME_IDX = [i for i, e in enumerate(_EVENTS) if e.is_runtime]
_CCEL = (VECTORS / "ccel.bin").read_bytes()[:2200]  # events end at 1933; the rest is 0xff
_ATT_RAW = (VECTORS / "attestation.bin").read_bytes()


def _flip(b: bytes, pos: int, bit: int) -> bytes:
    ba = bytearray(b)
    ba[pos % len(ba)] ^= 1 << bit
    return bytes(ba)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(_EVENTS) - 1), st.integers(0, 47), st.integers(0, 7))
def test_flipped_digest_breaks_replay(i: int, pos: int, bit: int) -> None:
    """Flipping any bit of any event's digest fails the comparison, naming the RTMR or event."""
    ev = _EVENTS[i]
    events = list(_EVENTS)
    events[i] = msgspec.structs.replace(ev, digest=_flip(ev.digest, pos, bit))
    report = replay_and_compare(events, _RTMRS)
    assert not report.ok
    assert any(f"RTMR{ev.imr} mismatch" in r for r in report.reasons)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_RUNTIME_IDX), st.integers(0, 63), st.integers(0, 7), st.booleans())
def test_flipped_runtime_payload_breaks_replay(i: int, pos: int, bit: int, name: bool) -> None:
    """A changed runtime payload or name (digest left alone) is caught by the digest rule."""
    ev = _EVENTS[i]
    events = list(_EVENTS)
    if name or not ev.event_payload:
        changed = msgspec.structs.replace(ev, event=_flip(ev.event.encode(), pos, bit % 7).decode())
    else:
        changed = msgspec.structs.replace(ev, event_payload=_flip(ev.event_payload, pos, bit))
    events[i] = changed
    report = replay_and_compare(events, _RTMRS)
    assert not report.ok
    assert any(
        f"event {i}" in r and "not sha384 of its name and payload" in r for r in report.reasons
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_only_typed_errors(data: bytes) -> None:
    """Random bytes make every parser return or raise EventLogError, nothing else."""
    for parse in (parse_ccel, decode_attestation, parse_json_event_log):
        try:
            parse(data)
        except EventLogError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_CCEL) - 1), st.integers(0, 7))
def test_mutated_ccel_only_typed_errors(pos: int, bit: int) -> None:
    """A one-bit-flipped CCEL parses or raises EventLogError."""
    try:
        parse_ccel(_flip(_CCEL, pos, bit))
    except EventLogError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_ATT_RAW) - 1), st.integers(0, 7))
def test_mutated_attestation_only_typed_errors(pos: int, bit: int) -> None:
    """A one-bit-flipped SCALE attestation decodes or raises EventLogError."""
    try:
        decode_attestation(_flip(_ATT_RAW, pos, bit))
    except EventLogError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=5),
        max_leaves=12,
    )
)
def test_random_json_only_typed_errors(value: object) -> None:
    """Any JSON value parses as an event log or raises EventLogError."""
    try:
        parse_json_event_log(json.dumps(value))
    except EventLogError:
        pass
