"""Deterministic sample instances of every event type, for the golden files."""

from __future__ import annotations

import types
import typing
from typing import Any

import msgspec

from pydstack.core.events import Event


def sample_value(tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is str:
        return f"{name}-1"
    if tp is int:
        return 7
    if tp is bool:
        return True
    if tp is bytes:
        return b"\x01\x02" + name.encode()
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return sample_value(args[0], name)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return (sample_value(args[0], name),)
        return tuple(sample_value(a, f"{name}{i}") for i, a in enumerate(args))
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return sample(tp)
    raise TypeError(f"no sample for {tp!r} ({name})")


def sample(event_type: type[Any]) -> Any:
    hints = typing.get_type_hints(event_type)
    values = {
        f.name: sample_value(hints[f.name], f.name) for f in msgspec.structs.fields(event_type)
    }
    return event_type(**values)


def sample_event(event_type: type[Event]) -> Event:
    event = sample(event_type)
    assert isinstance(event, Event)
    return event
