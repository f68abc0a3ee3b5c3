"""Schema evolution: every encoded event written by an earlier version still decodes the same."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from pydstack.core.events import EVENT_TYPES, decode_any, decode_body, tag_of, verify

GOLDEN = sorted(Path(__file__).parent.glob("v*/"))
TAGS = [tag_of(t) for t in EVENT_TYPES]


def test_every_event_type_has_a_golden_sample() -> None:
    """Adding a type means adding its golden files (`python -m tests.golden.make_golden`)."""
    have = {p.stem for d in GOLDEN for p in d.glob("*.msgpack")}
    assert set(TAGS) <= have


@pytest.mark.parametrize(
    "path",
    [p for d in GOLDEN for p in sorted(d.glob("*.msgpack"))],
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_golden_body_still_decodes_to_the_same_values(path: Path) -> None:
    event = decode_any(path.read_bytes())
    expected = json.loads(path.with_suffix(".json").read_text())
    assert type(event).__name__ == path.stem == tag_of(type(event))
    # Fields added later have defaults; every field the golden file had keeps its value.
    now = json.loads(msgspec.json.encode(event))
    assert {k: now[k] for k in expected} == expected


@pytest.mark.parametrize(
    "path",
    [p for d in GOLDEN for p in sorted(d.glob("*.message"))],
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_golden_message_still_verifies(path: Path) -> None:
    env = verify(path.read_bytes())
    assert env.type == path.stem
    assert decode_body(env) is not None


def test_unknown_fields_are_accepted() -> None:
    """A newer writer may add fields; this version ignores them instead of failing."""
    body = msgspec.msgpack.encode(
        {"type": "VmRejected", "vm_id": "v", "reason": "r", "added_in_v9": [1, 2]}
    )
    event = decode_any(body)
    assert msgspec.to_builtins(event) == {"type": "VmRejected", "vm_id": "v", "reason": "r"}
