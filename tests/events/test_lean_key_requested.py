"""Lean KeyRequested (issue 18.2): the attestation named by sha256, old inline events intact."""

from __future__ import annotations

import hashlib

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from pydstack.core.events import KeyRequested, decode_any
from pydstack.core.kms.blobs import blob_problem, lean, with_blob

# Written before `attestation_sha256` existed: the attestation inline (b"scale-attestation").
INLINE_V1 = bytes.fromhex(
    "88a474797065ac4b6579526571756573746564aa726571756573745f6964a27231a66170705f6964d92861626162"
    "616261626162616261626162616261626162616261626162616261626162616261626162aa71756f74655f686173"
    "68a171ab6174746573746174696f6ec4117363616c652d6174746573746174696f6ea6706f6c696379a27b7dab76"
    "657269666965645f617407a66d6574686f64a94765744170704b6579"
)
# Written with the field: the attestation is a blob named "5d" * 32.
LEAN_V2 = bytes.fromhex(
    "88a474797065ac4b6579526571756573746564aa726571756573745f6964a27232a66170705f6964d92861626162"
    "616261626162616261626162616261626162616261626162616261626162616261626162aa71756f74655f686173"
    "68a171a6706f6c696379a27b7dab76657269666965645f617407a66d6574686f64a94765744170704b6579b26174"
    "746573746174696f6e5f736861323536d940" + "3564" * 32
)


def test_an_inline_event_written_before_the_field_decodes_unchanged() -> None:
    """The old form keeps its attestation, and reads as not lean (no hash)."""
    ev = decode_any(INLINE_V1)
    assert isinstance(ev, KeyRequested)
    assert ev.attestation == b"scale-attestation" and ev.attestation_sha256 == ""
    assert with_blob(ev, b"anything") == ev and blob_problem(ev, None) == ""


def test_a_lean_event_decodes_with_its_reference_and_no_inline_bytes() -> None:
    ev = decode_any(LEAN_V2)
    assert isinstance(ev, KeyRequested)
    assert ev.attestation == b"" and ev.attestation_sha256 == "5d" * 32
    assert (ev.request_id, ev.policy, ev.verified_at) == ("r2", "{}", 7)


@given(st.binary(min_size=1, max_size=4096))
def test_lean_then_with_blob_gives_back_the_inline_event(att: bytes) -> None:
    """Moving the attestation out and back in is the identity; the name is its sha256."""
    inline = KeyRequested(request_id="r", app_id="a", attestation=att, policy="{}")
    event, blob = lean(inline)
    assert blob == att and event.attestation == b""
    assert event.attestation_sha256 == hashlib.sha256(att).hexdigest()
    assert blob_problem(event, blob) == ""
    assert with_blob(event, blob) == msgspec.structs.replace(
        inline, attestation_sha256=event.attestation_sha256
    )


def test_a_missing_or_altered_blob_is_named_and_never_taken_as_evidence() -> None:
    event, _ = lean(KeyRequested(request_id="r", app_id="a", attestation=b"evidence"))
    assert "missing" in blob_problem(event, None)
    altered = b"evidencf"
    assert "altered" in blob_problem(event, altered)
    assert with_blob(event, altered).attestation == b""  # re-checks as no attestation
    assert with_blob(event, None).attestation == b""


def test_a_request_without_attestation_stays_as_it_is() -> None:
    ev = KeyRequested(request_id="r", app_id="a")
    assert lean(ev) == (ev, b"")
