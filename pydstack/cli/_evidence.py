"""The audit's read of the evidence bucket: every blob a KMS event names, checked by its hash.

A lean ``KeyRequested`` (``attestation_sha256``) names its attestation in the stream's evidence
bucket (``adapters.nats.objectstore``). The audit fetches each one, and a blob that is missing
or whose bytes do not hash to the name is an error naming the event (its seq, subject and
request id): the decision's evidence is gone or not the evidence. One exception, a warning: a
request its KMS died before storing the blob of, closed on restart as abandoned (no key left).
The blobs that are right are handed to the re-check, which then sees the request as if its
attestation were inline (``core.kms.blobs.with_blob``).

    blobs, findings = await fetch_evidence(store, kms_logs)   # kms_logs: subject -> (seq, data)
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from pydstack.adapters.nats import EventStore
from pydstack.adapters.nats.objectstore import BlobError, EvidenceBucket
from pydstack.core.audit import Finding
from pydstack.core.events import CodecError, KeyDenied, KeyRequested, decode_body, open_envelope
from pydstack.core.kms import ABANDONED
from pydstack.core.kms.blobs import blob_problem

_IN_FLIGHT = 32  # blob reads in flight at once (two direct gets each)


async def fetch_evidence(
    store: EventStore, kms_logs: Mapping[str, Sequence[tuple[int, bytes]]]
) -> tuple[dict[str, bytes], list[Finding]]:
    """The blobs the KMS events name that hash right (name -> bytes), and a finding for each
    event whose blob is missing or altered."""
    refs: list[tuple[int, str, KeyRequested]] = []
    abandoned: set[str] = set()
    for subj, recs in kms_logs.items():
        for seq, data in recs:
            try:
                ev = decode_body(open_envelope(data))
            except CodecError:
                continue  # the log audit reports it
            if isinstance(ev, KeyRequested) and ev.attestation_sha256:
                refs.append((seq, subj, ev))
            elif isinstance(ev, KeyDenied) and ev.reason == ABANDONED:
                abandoned.add(ev.request_id)
    if not refs:
        return {}, []
    bucket = EvidenceBucket.of(store)
    gate = asyncio.Semaphore(_IN_FLIGHT)

    async def get(name: str) -> bytes | None:
        async with gate:
            try:
                return await bucket.get(name)
            except BlobError:  # no bucket at all, or unreadable metadata: not the evidence
                return None

    names = sorted({r.attestation_sha256 for _, _, r in refs})
    fetched: list[bytes | None] = list(await asyncio.gather(*(get(n) for n in names)))
    got = dict(zip(names, fetched, strict=True))
    blobs: dict[str, bytes] = {}
    out: list[Finding] = []
    for seq, subj, req in refs:
        blob = got[req.attestation_sha256]
        problem = blob_problem(req, blob)
        if not problem:
            assert blob is not None
            blobs[req.attestation_sha256] = blob
            continue
        cut_off = req.request_id in abandoned and blob is None
        reason = f"seq {seq}: {subj}: {req.request_id}: KeyRequested: {problem}"
        if cut_off:
            reason += " (its KMS died before storing it; the request was closed as abandoned)"
        out.append(Finding(seq=seq, code="kms_evidence_blob", reason=reason, subject=subj,
                           severity="warning" if cut_off else "error"))  # fmt: skip
    return blobs, out
