"""Lean KMS events: a request's attestation moved out of the log into a content-addressed blob.

A ``KeyRequested`` carries the whole SCALE attestation its decision relied on (~6.5 KB per
boot, up to 256 KiB), which made it most of a fleet's log by bytes. The lean form keeps only
``attestation_sha256``; the bytes live in the evidence bucket under that name. Content
addressing is what makes the move safe: whoever stores or serves the blob, the event's hash
decides whether it is the evidence, so a substituted or altered blob is found, never trusted.
Pure. Usage::

    event, blob = lean(key_requested(req))          # store `blob` under event.attestation_sha256
    problem = blob_problem(event, fetched)          # "" when fetched is the evidence
    whole = with_blob(event, fetched)               # what the audit re-checks, as if inline
"""

from __future__ import annotations

import hashlib

import msgspec

from pydstack.core.events.kms import KeyRequested


def blob_name(data: bytes) -> str:
    """The name a blob is stored under: the hex sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def lean(requested: KeyRequested) -> tuple[KeyRequested, bytes]:
    """The request naming its attestation by hash, and the attestation to store apart. A
    request without an attestation (or already lean) is returned as is, with no blob."""
    raw = requested.attestation
    if not raw:
        return requested, b""
    r = msgspec.structs.replace(requested, attestation=b"", attestation_sha256=blob_name(raw))
    return r, raw


def blob_problem(requested: KeyRequested, data: bytes | None) -> str:
    """Why `data` (None: not found) is not the attestation `requested` names ("" when it is)."""
    ref = requested.attestation_sha256
    if not ref:
        return ""
    if data is None:
        return f"its attestation blob {ref} is missing from the evidence bucket"
    got = blob_name(data)
    if got != ref:
        return f"its attestation blob {ref} was altered (the bucket holds bytes hashing to {got})"
    return ""


def with_blob(requested: KeyRequested, data: bytes | None) -> KeyRequested:
    """The request as if its attestation were inline, when `data` is the blob it names; else
    unchanged (a missing or altered blob re-checks as no attestation at all)."""
    if not requested.attestation_sha256 or requested.attestation or data is None:
        return requested
    if blob_problem(requested, data):
        return requested
    return msgspec.structs.replace(requested, attestation=data)
