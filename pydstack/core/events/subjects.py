"""Subjects: one per aggregate, ``dstack.<kind>.<id>``.

The event type travels in the envelope, so one aggregate is exactly one subject and
``Nats-Expected-Last-Subject-Sequence`` guards the whole aggregate.
"""

from __future__ import annotations

import re

PREFIX = "dstack"
KINDS = frozenset({"app", "vm", "host", "cvm", "kms", "gateway", "actor", "keyring", "image"})
ALL = f"{PREFIX}.>"

# A NATS subject token: no dots, wildcards or whitespace. We are stricter than NATS so that
# ids stay printable and safe in file names and URLs.
_TOKEN = re.compile(r"^[A-Za-z0-9_\-:]{1,128}$")


class SubjectError(ValueError):
    """A subject or id that cannot name an aggregate."""


def subject(kind: str, aggregate_id: str) -> str:
    """The subject of one aggregate, e.g. ``subject("vm", "a1b2") == "dstack.vm.a1b2"``."""
    if kind not in KINDS:
        raise SubjectError(f"unknown aggregate kind {kind!r}; expected one of {sorted(KINDS)}")
    if not _TOKEN.match(aggregate_id):
        raise SubjectError(
            f"bad {kind} id {aggregate_id!r}: use 1-128 letters, digits, '_', '-' or ':'"
        )
    return f"{PREFIX}.{kind}.{aggregate_id}"


def parse_subject(subj: str) -> tuple[str, str]:
    """Split ``dstack.<kind>.<id>`` into ``(kind, id)``; raise SubjectError otherwise."""
    parts = subj.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise SubjectError(f"not an aggregate subject: {subj!r} (expected {PREFIX}.<kind>.<id>)")
    subject(parts[1], parts[2])  # validates
    return parts[1], parts[2]


def kind_filter(kind: str) -> str:
    """The wildcard that matches every aggregate of one kind."""
    if kind not in KINDS:
        raise SubjectError(f"unknown aggregate kind {kind!r}; expected one of {sorted(KINDS)}")
    return f"{PREFIX}.{kind}.*"
