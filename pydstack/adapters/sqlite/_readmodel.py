"""SQLite read models of apps, VMs and hosts, with the stream position in the same transaction.

Each row holds the fold's state for one aggregate, encoded as msgpack in ``data``, plus a few
plain columns for queries. A batch is folded with the pure folds of
``pydstack.core.projections`` (the states of the aggregates it touches are loaded once, folded
in memory, and upserted at the end), then the rows and the checkpoint are written in one
transaction. So a crash leaves either both or neither, a redelivered event (``seq`` at or below
the checkpoint) changes nothing, and deleting the file and replaying the log rebuilds exactly the
same rows. One process writes a given file; any number may read it (WAL). A ``ReadModel`` is
used by one thread at a time (handing it to ``asyncio.to_thread`` is fine).

Stored messages go through the write policy (``pydstack.core.policy.Gate``) before they are
folded: what it refuses is counted, never folded. What the verdicts depend on, the keyring and
each VM's owner, is stored with the checkpoint in the same transaction, so a restart judges
the next messages exactly as a rebuild from the log would.

Usage::

    with ReadModel.open("state/readmodel.db", anchor=admin_key) as rm:
        rm.apply_messages(store_batch)  # objects with .seq, .subject, .data, .time_ns
        rm.position()                   # last stream sequence applied
        rm.list_vms(host="h1", state="running")
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, Self

import msgspec
import sqlite_utils

from pydstack.core.policy import STRUCTURAL, Allowed, Gate, Keyring, vm_app_key
from pydstack.core.projections import (
    App,
    Applied,
    Host,
    Model,
    Projections,
    Vm,
    VmState,
    apps,
    from_allowed,
    hosts,
    route,
    vms,
)

# Bump when a state Struct changes incompatibly: the file is then rebuilt from the log.
SCHEMA: Final = 2  # 2: the gate's state (keyring, VM owners) is kept too
DEFAULT_NAME: Final = "main"

_encode: Final = msgspec.msgpack.Encoder().encode
_decode_app: Final = msgspec.msgpack.Decoder(App).decode
_decode_vm: Final = msgspec.msgpack.Decoder(Vm).decode
_decode_host: Final = msgspec.msgpack.Decoder(Host).decode
_decode_keyring: Final = msgspec.msgpack.Decoder(Keyring).decode

_TABLES: Final[dict[str, dict[str, type]]] = {
    "apps": {
        "app_id": str, "name": str, "owner": str, "compose_hash": str, "upgrades": int,
        "removed": int, "registered_ns": int, "updated_ns": int, "seq": int, "data": bytes,
    },
    "vms": {
        "vm_id": str, "app_id": str, "name": str, "host": str, "cid": int, "vcpu": int,
        "memory_mb": int, "state": str, "desired": str, "reason": str, "boot_stage": str,
        "last_error": str, "restarts": int, "updated_ns": int, "seq": int, "data": bytes,
    },
    "hosts": {
        "host_id": str, "address": str, "vcpu": int, "memory_mb": int, "vcpu_used": int,
        "memory_used_mb": int, "vms": int, "left": int, "last_heartbeat_ns": int, "seq": int,
        "data": bytes,
    },
}  # fmt: skip
_PK: Final[dict[str, str]] = {"apps": "app_id", "vms": "vm_id", "hosts": "host_id"}
_INDEXES: Final = {"vms": (["host"], ["app_id"], ["state"])}


def _insert_sql(table: str) -> str:
    cols = list(_TABLES[table])
    marks = ", ".join("?" * len(cols))
    # An upsert updates in place, so indexes on unchanged columns are not rewritten.
    update = ", ".join(f"{c} = excluded.{c}" for c in cols if c != _PK[table])
    return (
        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks}) "
        f"ON CONFLICT ({_PK[table]}) DO UPDATE SET {update}"
    )


_INSERT: Final = {t: _insert_sql(t) for t in _TABLES}


def _app_row(s: App) -> tuple[Any, ...]:
    return (
        s.app_id, s.name, s.owner, s.compose_hash, s.upgrades, int(s.removed),
        s.registered_ns, s.updated_ns, s.seq, _encode(s),
    )  # fmt: skip


def _vm_row(s: Vm) -> tuple[Any, ...]:
    r = s.resources
    return (
        s.vm_id, s.app_id, s.name, s.host, s.cid, r.vcpu, r.memory_mb, s.state, s.desired,
        s.reason, s.boot_stage, s.last_error, s.restarts, s.updated_ns, s.seq, _encode(s),
    )  # fmt: skip


def _host_row(s: Host) -> tuple[Any, ...]:
    return (
        s.host_id, s.address, s.vcpu, s.memory_mb, s.vcpu_used, s.memory_used_mb,
        len(s.placements), int(s.left), s.last_heartbeat_ns, s.seq, _encode(s),
    )  # fmt: skip


class StoredMessage(Protocol):
    """A message as the event store returns it (``pydstack.adapters.nats.Recorded`` fits)."""

    @property
    def seq(self) -> int: ...
    @property
    def subject(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    @property
    def time_ns(self) -> int: ...


@dataclass(frozen=True, slots=True)
class BatchResult:
    applied: int = 0  # events folded into a read model
    ignored: int = 0  # events past the checkpoint that no read model uses (KMS, unknown tags…)
    redelivered: int = 0  # events at or below the checkpoint: skipped
    malformed: int = 0  # messages that did not decode (the auditor reports them)
    position: int = 0  # the checkpoint after the batch
    refused: int = 0  # well-formed messages the write policy refuses (not folded)


_DECODE: Final[dict[Model, Callable[[bytes], Any]]] = {
    "apps": _decode_app,
    "vms": _decode_vm,
    "hosts": _decode_host,
}
_APPLY: Final[dict[Model, Callable[[Any, Applied], Any]]] = {
    "apps": apps.apply,
    "vms": vms.apply,
    "hosts": hosts.apply,
}
_ROW: Final[dict[Model, Callable[[Any], tuple[Any, ...]]]] = {
    "apps": _app_row,
    "vms": _vm_row,
    "hosts": _host_row,
}
_LOAD_CHUNK: Final = 500


def _load(conn: sqlite3.Connection, model: Model, keys: set[str]) -> dict[str, Any]:
    """The stored states of ``keys`` (missing ones are absent), a few queries per batch."""
    decode, pk, out = _DECODE[model], _PK[model], {}
    ordered = sorted(keys)
    for i in range(0, len(ordered), _LOAD_CHUNK):
        chunk = ordered[i : i + _LOAD_CHUNK]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT {pk}, data FROM {model} WHERE {pk} IN ({marks})"
        for key, data in conn.execute(sql, chunk):
            out[key] = decode(data)
    return out


def _fold_and_write(conn: sqlite3.Connection, todo: list[tuple[Model, str, Applied]]) -> None:
    """Fold ``todo`` onto the stored states of the aggregates it touches and upsert them."""
    keys: dict[Model, set[str]] = {"apps": set(), "vms": set(), "hosts": set()}
    for model, key, _ in todo:
        keys[model].add(key)
    states = {m: _load(conn, m, k) if k else {} for m, k in keys.items()}
    for model, key, a in todo:
        got = states[model]
        got[key] = _APPLY[model](got.get(key), a)
    for model, got in states.items():
        rows = [_ROW[model](s) for s in got.values() if s is not None]
        if rows:
            conn.executemany(_INSERT[model], rows)


class ReadModel:
    """Apps, VMs and hosts folded from the log into one SQLite file, with its checkpoint."""

    def __init__(
        self, db: sqlite_utils.Database, name: str = DEFAULT_NAME, gate: Gate | None = None
    ) -> None:
        self.db = db
        self.name = name
        self.gate = gate or Gate()

    @classmethod
    def open(cls, path: str | Path, *, anchor: bytes | None = None) -> ReadModel:
        """Open or create the file (tables are created idempotently, WAL mode).

        A file written with another ``SCHEMA`` is emptied so that it is rebuilt from the log.
        ``anchor``: the admin key the log's keyring must be rooted in (pydstack.core.policy).
        """
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One thread at a time, but not always the opening one (asyncio.to_thread is fine).
        conn = sqlite3.connect(str(path), timeout=10.0, check_same_thread=False)
        db = sqlite_utils.Database(conn, execute_plugins=False)
        db.enable_wal()
        db.execute("PRAGMA synchronous=NORMAL")
        rm = cls(db)
        try:
            rm._create()
            rm._load_gate(anchor)
        except BaseException:
            db.close()
            raise
        return rm

    def _create(self) -> None:
        with self.db.atomic():
            for table, cols in _TABLES.items():
                self.db.table(table).create(cols, pk=_PK[table], if_not_exists=True)
            for table, indexes in _INDEXES.items():
                for index in indexes:
                    self.db.table(table).create_index(index, if_not_exists=True)
            self.db.table("checkpoints").create(
                {"name": str, "seq": int, "schema": int}, pk="name", if_not_exists=True
            )
            self.db.table("keyrings").create(
                {"name": str, "data": bytes}, pk="name", if_not_exists=True
            )
            self.db.table("vm_owners").create({"vm_id": str, "host": str}, pk="vm_id",
                                              if_not_exists=True)  # fmt: skip
            row = self.db.execute(
                "SELECT schema FROM checkpoints WHERE name = ?", [self.name]
            ).fetchone()
            if row is None or row[0] != SCHEMA:
                self._clear()

    def _clear(self) -> None:
        for table in (*_TABLES, "keyrings", "vm_owners"):
            self.db.execute(f"DELETE FROM {table}")
        self.db.execute(
            "INSERT OR REPLACE INTO checkpoints (name, seq, schema) VALUES (?, 0, ?)",
            [self.name, SCHEMA],
        )

    def reset(self) -> None:
        """Forget everything (rows and checkpoint) so the next batches rebuild from seq 1."""
        with self.db.atomic():
            self._clear()
        self.gate = Gate.pinned(self.gate.keyring.anchor if self.gate.keyring.pinned else None)

    def _load_gate(self, anchor: bytes | None) -> None:
        """The keyring as of the checkpoint (owners are loaded per batch, see _owners)."""
        row = self.db.execute("SELECT data FROM keyrings WHERE name = ?", [self.name]).fetchone()
        gate = Gate.pinned(anchor)
        if row is not None:
            gate.keyring = _decode_keyring(row[0])
            gate.pin(anchor)  # raises if the stored keyring is anchored to another key
        # app owners: few, and a tenant's VmRequested names its app in the body, not the subject
        sql = "SELECT vm_id, host FROM vm_owners WHERE vm_id LIKE 'app.%'"
        gate.owners.update(self.db.execute(sql).fetchall())
        self.gate = gate

    def _owners(self, messages: list[StoredMessage]) -> None:
        """Teach the gate the stored owners (host, app) of the VMs a batch touches and it does
        not know (rows ``<vm_id>`` and ``vmapp.<vm_id>``; app owners, ``app.<app_id>``, are
        all loaded with the gate)."""
        vms = {m.subject[10:] for m in messages if m.subject.startswith("dstack.vm.")}
        wanted = (vms | {vm_app_key(v) for v in vms}) - self.gate.owners.keys()
        ordered = sorted(wanted)
        for i in range(0, len(ordered), _LOAD_CHUNK):
            chunk = ordered[i : i + _LOAD_CHUNK]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT vm_id, host FROM vm_owners WHERE vm_id IN ({marks})"
            for vm_id, host in self.db.execute(sql, chunk):
                self.gate.owners[vm_id] = host

    def _save_gate(self, keyring_before: Keyring) -> None:
        if self.gate.keyring is not keyring_before:
            self.db.execute(
                "INSERT OR REPLACE INTO keyrings (name, data) VALUES (?, ?)",
                [self.name, _encode(self.gate.keyring)],
            )
        changes = self.gate.take_owner_changes()
        if changes:
            self.db.conn.executemany(
                "INSERT OR REPLACE INTO vm_owners (vm_id, host) VALUES (?, ?)",
                list(changes.items()),
            )

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------

    def position(self) -> int:
        """The last stream sequence applied (0 for an empty read model)."""
        row = self.db.execute("SELECT seq FROM checkpoints WHERE name = ?", [self.name]).fetchone()
        return int(row[0]) if row else 0

    def apply_batch(self, events: Iterable[Applied], *, upto: int = 0) -> BatchResult:
        """Fold ``events`` (ascending seq) and write rows + checkpoint in one transaction.

        Events at or below the checkpoint are skipped. ``upto`` moves the checkpoint further
        (to the seq of the last message read, when trailing messages did not decode). If
        anything raises, nothing of the batch is written.
        """
        return self._run(((a.seq, a, None) for a in events), upto)

    def apply_messages(self, messages: Iterable[StoredMessage]) -> BatchResult:
        """Judge stored messages (the write policy), decode and apply them as one batch.

        Unknown event types, messages that do not decode and messages the policy refuses
        still advance the checkpoint: they are counted in the result, and reported by the
        auditor, not retried forever.
        """
        msgs = list(messages)
        self._owners(msgs)
        return self._run(((m.seq, None, m) for m in msgs), 0)

    def _judge(self, m: StoredMessage) -> tuple[Applied | None, str]:
        """The fold input of a stored message, or None and why ("malformed", "refused", "")."""
        v = self.gate.judge(m.seq, m.subject, m.data)
        if isinstance(v, Allowed):
            return from_allowed(v, m.seq, m.time_ns), ""
        return None, "malformed" if v.reason in STRUCTURAL else "refused"

    def _run(
        self, items: Iterable[tuple[int, Applied | None, StoredMessage | None]], upto: int
    ) -> BatchResult:
        """Apply ``(seq, event, None)`` or ``(seq, None, message)`` items in one transaction;
        a message is judged only past the checkpoint (the gate sees each seq once)."""
        ignored = redelivered = malformed = refused = 0
        keyring = self.gate.keyring
        with self.db.atomic():
            start = pos = self.position()
            todo: list[tuple[Model, str, Applied]] = []
            for seq, a, m in items:
                if seq <= pos:
                    redelivered += 1
                    continue
                pos = seq
                why = ""
                if m is not None:
                    a, why = self._judge(m)
                target = None if a is None else route(a.event)
                if target is not None and a is not None:
                    todo.append((target[0], target[1], a))
                elif why == "malformed":
                    malformed += 1
                elif why == "refused":
                    refused += 1
                else:
                    ignored += 1
            pos = max(pos, upto)
            if pos > start:
                _fold_and_write(self.db.conn, todo)
                self._save_gate(keyring)
                self.db.execute("UPDATE checkpoints SET seq = ? WHERE name = ?", [pos, self.name])
        return BatchResult(len(todo), ignored, redelivered, malformed, pos, refused)

    # -- reading ---------------------------------------------------------------------------

    def _states(self, table: str, decode: Any, where: list[str], args: list[object]) -> list[Any]:
        rows = self.db.table(table).rows_where(
            " AND ".join(where) or None, args, order_by=_PK[table], select="data"
        )
        return [decode(r["data"]) for r in rows]

    def list_apps(self, *, include_removed: bool = True) -> list[App]:
        where = [] if include_removed else ["removed = 0"]
        out: list[App] = self._states("apps", _decode_app, where, [])
        return out

    def get_app(self, app_id: str) -> App | None:
        got: list[App] = self._states("apps", _decode_app, ["app_id = ?"], [app_id])
        return got[0] if got else None

    def list_vms(
        self, *, host: str | None = None, app: str | None = None, state: VmState | None = None
    ) -> list[Vm]:
        where: list[str] = []
        args: list[object] = []
        for col, val in (("host", host), ("app_id", app), ("state", state)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        out: list[Vm] = self._states("vms", _decode_vm, where, args)
        return out

    def get_vm(self, vm_id: str) -> Vm | None:
        got: list[Vm] = self._states("vms", _decode_vm, ["vm_id = ?"], [vm_id])
        return got[0] if got else None

    def list_hosts(self, *, include_left: bool = True) -> list[Host]:
        where = [] if include_left else ["left = 0"]
        out: list[Host] = self._states("hosts", _decode_host, where, [])
        return out

    def get_host(self, host_id: str) -> Host | None:
        got: list[Host] = self._states("hosts", _decode_host, ["host_id = ?"], [host_id])
        return got[0] if got else None

    def snapshot(self) -> Projections:
        """Everything as in-memory fold state (equal to ``fold`` of the same events)."""
        with self.db.atomic():  # one consistent read
            return Projections(
                apps={s.app_id: s for s in self.list_apps()},
                vms={s.vm_id: s for s in self.list_vms()},
                hosts={s.host_id: s for s in self.list_hosts()},
                seq=self.position(),
            )
