"""The shared base of every event body.

A body is a small frozen ``msgspec.Struct`` with a fixed tag string. The tag, never the class
name, identifies the type on the log, so a class may be renamed freely. Bodies accept unknown
fields (a newer writer may have added some), which is half of the schema-evolution rule in
``docs/schema-evolution.md``.
"""

from __future__ import annotations

import msgspec


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=True):
    """Base of all event bodies; subclasses set ``tag="Name"`` and never change it."""


def tag_of(event_type: type[Event]) -> str:
    """The tag string an event class is written with."""
    tag = event_type.__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"{event_type.__name__} has no string tag")
    return tag
