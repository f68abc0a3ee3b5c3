"""The scheduler's checkpoint: resume its placement view from SQLite, verified against the log.

A checkpoint at sequence C is the view folded from the log's messages 1..C (every subject,
through the write policy), written in one transaction with C, the hash of the message at C
and a MAC keyed by the scheduler's signing key. It is used only if all of these hold, else the
scheduler folds the whole log as it did without one (and overwrites the file):

- the file opens, is this actor's, has this ``SCHEMA`` and its MAC matches (an edited row, an
  edited head or sequence, a truncated or foreign file fail here);
- it was folded under this configuration (host defaults, signature checks);
- the log still holds it: the message at C has the stored hash, and every chain head the view
  names (each host's last version, each undecided VM's) is on the log with its hash (a
  checkpoint of another log, or of a stream recreated or rolled back since, fails here).

Resuming then folds (and judges) only the messages after C. The invariant with the durable
consumer is in docs/architecture.md ("Checkpoints and consumers").
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Final

import structlog
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from pydstack.adapters.nats import ConflictError, EventStore, Version
from pydstack.adapters.sqlite import CheckpointFile, Snapshot
from pydstack.core.events import Signer, message_hash

from ._placement_view import SCHEMA, HostDefaults, PlacementView
from .trust import Judge

_log = structlog.get_logger("pydstack.scheduler")
_CHECKS: Final = 32  # chain heads looked up on the log at once


def checkpoint_key(signer: Signer) -> bytes:
    """The MAC key: derived from the signing key, so only the scheduler can write a file it
    will trust (a fresh key per run, as without --key-file, means a rebuild per run)."""
    seed = signer.sodium_key[:32] or signer.private_key.private_bytes(
        Encoding.Raw, PrivateFormat.Raw, NoEncryption()
    )
    return hashlib.sha256(b"pydstack scheduler checkpoint\0" + seed).digest()


def open_checkpoint(path: object, actor: str, signer: Signer) -> CheckpointFile:
    return CheckpointFile.open(str(path), actor=actor, schema=SCHEMA, key=checkpoint_key(signer))


async def _on_log(store: EventStore, subject: str, v: Version) -> bool:
    try:
        return (await store.version_at(subject, v.seq)).hash == v.hash
    except ConflictError:  # no message there, or another subject's
        return False


async def resume(
    store: EventStore,
    cp: CheckpointFile,
    defaults: HostDefaults,
    check_signatures: bool,
    judge: Judge,
) -> tuple[PlacementView | None, str]:
    """The view the checkpoint holds if it is usable (see the module doc), else None and why."""
    snap, why = await asyncio.to_thread(cp.load)
    if snap is None:
        return None, why
    try:
        view = PlacementView.restored(
            snap.seq, snap.rows, defaults, check_signatures, judge, store.anchor
        )
    except ValueError as exc:
        return None, f"unusable: {exc}"
    if snap.seq > await store.last_seq():
        return None, f"ahead of the log (checkpoint at {snap.seq})"
    heads = [(snap.head_subject, Version(snap.seq, snap.head_hash)), *view.heads().items()]
    for i in range(0, len(heads), _CHECKS):
        chunk = heads[i : i + _CHECKS]
        found = await asyncio.gather(*(_on_log(store, s, v) for s, v in chunk))
        for (subject, v), ok in zip(chunk, found, strict=True):
            if not ok:
                return None, f"chain head of {subject} at {v.seq} is not on the log"
    return view, ""


async def save(cp: CheckpointFile, view: PlacementView) -> None:
    """Write the view as of its cursor (rows encoded here, written in a thread)."""
    if view.head is None:
        return
    snap = Snapshot(view.cursor, view.head.subject, message_hash(view.head.data), view.rows())
    try:
        await asyncio.to_thread(cp.save, snap)
    except Exception as exc:  # a checkpoint is an optimisation: the log is still there
        _log.warning("checkpoint not written", error=str(exc) or type(exc).__name__)
        return
    _log.debug("checkpoint written", seq=view.cursor)
