"""An actor's checkpoint: its read model as keyed rows, the stream sequence they reflect, the
chain head there, and a MAC, in one SQLite file (sqlite-utils) written in one transaction.

The actor encodes its state as rows (``kind -> key -> bytes``); this module stores and loads
them and says why a file cannot be used. A file is used only if it opens, has this actor's
name and ``schema``, and its MAC (HMAC-SHA256 over every row, the sequence and the head, keyed
by a secret only the actor holds) matches; otherwise :meth:`CheckpointFile.load` returns None
and a reason, and the actor rebuilds from the log. Whether the log still holds the head (the
message at ``seq`` has ``head_hash``) is the actor's check, since only it reads the log::

    with CheckpointFile.open(path, actor="scheduler", schema=1, key=secret) as cp:
        got, why = cp.load()            # (Snapshot | None, "" or why it is unusable)
        cp.save(Snapshot(seq, subject, head_hash, rows))
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import msgspec
import sqlite_utils

Rows = dict[str, dict[str, bytes]]  # kind -> key -> encoded state
_encode: Final = msgspec.msgpack.Encoder().encode


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A read model as of stream sequence ``seq``, whose message is on ``head_subject`` with
    hash ``head_hash``."""

    seq: int
    head_subject: str
    head_hash: bytes
    rows: Rows = field(default_factory=dict)


def _mac(key: bytes, actor: str, schema: int, snap: Snapshot) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    h.update(_encode((actor, schema, snap.seq, snap.head_subject, snap.head_hash)))
    for kind in sorted(snap.rows):
        for k, v in sorted(snap.rows[kind].items()):
            h.update(_encode((kind, k, v)))
    return h.digest()


class CheckpointFile:
    """One actor's checkpoint file; one writer (the actor), used from one thread at a time."""

    def __init__(self, path: Path, actor: str, schema: int, key: bytes) -> None:
        self.path, self.actor, self.schema, self._key = path, actor, schema, key
        self.db: sqlite_utils.Database | None = None

    @classmethod
    def open(cls, path: str | Path, *, actor: str, schema: int, key: bytes) -> CheckpointFile:
        cp = cls(Path(path), actor, schema, key)
        cp.path.parent.mkdir(parents=True, exist_ok=True)
        return cp

    def _connect(self) -> sqlite_utils.Database:
        if self.db is None:
            conn = sqlite3.connect(str(self.path), timeout=10.0, check_same_thread=False)
            self.db = sqlite_utils.Database(conn, execute_plugins=False)
        return self.db

    def load(self) -> tuple[Snapshot | None, str]:
        """The stored snapshot, or None and why it cannot be used ("missing", "stale schema",
        "corrupt: ...", "tampered: ...")."""
        if not self.path.exists():
            return None, "missing"
        try:
            db = self._connect()
            meta = db.execute(
                "SELECT actor, schema, seq, head_subject, head_hash, mac FROM meta"
            ).fetchall()
            if len(meta) != 1:
                return None, f"corrupt: {len(meta)} meta rows"
            actor, schema, seq, head_subject, head_hash, mac = meta[0]
            if actor != self.actor:
                return None, f"tampered: written by actor {actor!r}"
            if schema != self.schema:
                return None, f"stale schema {schema} (this version writes {self.schema})"
            rows: Rows = {}
            for kind, k, v in db.execute("SELECT kind, key, data FROM rows"):
                rows.setdefault(str(kind), {})[str(k)] = bytes(v)
            snap = Snapshot(int(seq), str(head_subject), bytes(head_hash), rows)
        except (sqlite3.DatabaseError, TypeError, ValueError) as exc:
            self.close()
            return None, f"corrupt: {exc}"
        if not hmac.compare_digest(bytes(mac), _mac(self._key, self.actor, self.schema, snap)):
            return None, "tampered: the MAC does not match its rows"
        return snap, ""

    def save(self, snap: Snapshot) -> None:
        """Replace the stored snapshot with ``snap``, all or nothing. A file that does not
        open as a database (truncated, overwritten) is replaced."""
        try:
            self._write(snap)
        except sqlite3.DatabaseError:
            self.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._write(snap)

    def _write(self, snap: Snapshot) -> None:
        db = self._connect()
        mac = _mac(self._key, self.actor, self.schema, snap)
        db.table("meta").create(
            {"actor": str, "schema": int, "seq": int, "head_subject": str, "head_hash": bytes,
             "mac": bytes}, if_not_exists=True,
        )  # fmt: skip
        db.table("rows").create(
            {"kind": str, "key": str, "data": bytes}, pk=("kind", "key"), if_not_exists=True
        )
        with db.atomic():  # one transaction: rows, sequence and MAC together
            db.execute("DELETE FROM meta")
            db.execute("DELETE FROM rows")
            db.execute(
                "INSERT INTO meta VALUES (?, ?, ?, ?, ?, ?)",
                [self.actor, self.schema, snap.seq, snap.head_subject, snap.head_hash, mac],
            )
            db.conn.executemany(
                "INSERT INTO rows (kind, key, data) VALUES (?, ?, ?)",
                [(kind, k, v) for kind, got in snap.rows.items() for k, v in got.items()],
            )

    def close(self) -> None:
        if self.db is not None:
            with contextlib.suppress(Exception):
                self.db.close()
            self.db = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
