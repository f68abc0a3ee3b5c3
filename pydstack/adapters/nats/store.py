"""The event store: one JetStream stream, optimistic appends, aggregate reads and followers.

Usage::

    async with await EventStore.connect("nats://127.0.0.1:4222", signer) as store:
        await store.ensure_stream()
        history, version = await store.read_aggregate("dstack.vm.v1")
        await store.append("dstack.vm.v1", [VmRejected(vm_id="v1", reason="full")], version)

Appends are compare-and-set on a subject (``Nats-Expected-Last-Subject-Sequence``) and
idempotent (``Nats-Msg-Id`` = event id). Several aggregates can be changed in one atomic batch
(``commit``), each guarded by its own expected sequence: the server stores all or none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import nats
import nats.errors
import nats.js.errors
import nkeys
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from pydstack.core.events import ALL_SUBJECTS, Event, Signer, message_hash, seal

from ._rideout import Leaderless, retrying, try_timeout
from ._types import DEFAULT_STREAM, NEW, Change, Recorded, StreamSettings, Version, new_event_id
from ._wire import Acks, any_reachable, request, stamp, versions_after
from .errors import (
    ConflictError,
    NoLeader,
    PermissionDenied,
    StoreClosed,
    StoreError,
    StreamMissing,
    Unreachable,
)

__all__ = [
    "DEFAULT_STREAM", "NEW", "Change", "EventStore", "Recorded", "StreamSettings", "Version",
    "new_event_id",
]  # fmt: skip

_WRONG_LAST_SEQ: Final = 10071
_BATCH_DUP_ID: Final = 10201
_STREAM_NOT_FOUND: Final = 10059
_NO_SUITABLE_PEERS: Final = 10005  # a meta leader that does not know enough peers yet
_H_EXPECT: Final = "Nats-Expected-Last-Subject-Sequence"
_H_MSGID: Final = "Nats-Msg-Id"
_LEADER_LAST: Final = re.compile(r"wrong last sequence: (\d+)")


T = TypeVar("T")

_READ_BATCH: Final = 512  # messages per direct get of read()
_FOLLOW_POLL_S: Final = 0.5  # a follower looks again at least this often


def inbox_prefix(nkey: str) -> str:
    """The reply subjects of one NATS user (``_INBOX.<public nkey>``): the server lets each
    identity subscribe only below its own, so no role reads another's replies."""
    return f"_INBOX.{nkey}"


class _ClusterForming(Exception):
    """The JetStream cluster cannot take the stream yet; worth retrying for a while."""


@dataclass
class EventStore:
    nc: Client
    js: JetStreamContext
    signer: Signer
    url: str
    settings: StreamSettings = field(default_factory=StreamSettings)
    timeout: float = 5.0
    retries: int = 3
    denials: dict[str, str] = field(default_factory=dict)
    # The admin public key this node pins as the root of the log's keyring: every fold reading
    # through this connection judges events against a keyring whose first entry it signed
    # (pydstack.core.policy). None: trust the first keyring entry's own signer.
    anchor: bytes | None = None
    _acks: Acks | None = field(
        default=None, init=False, repr=False
    )  # lower-cased subject -> refusal

    @classmethod
    async def connect(
        cls,
        url: str,
        signer: Signer,
        *,
        settings: StreamSettings | None = None,
        nkey_seed: str | None = None,
        name: str | None = None,
        connect_timeout: float = 2.0,
        reconnect: bool = True,
        anchor: bytes | None = None,
    ) -> EventStore:
        """Connect to NATS; fail fast with `Unreachable` instead of retrying forever."""
        opts: dict[str, Any] = {
            "servers": [u.strip() for u in url.split(",")],
            "name": name or signer.actor,
            "connect_timeout": connect_timeout,
            "allow_reconnect": reconnect,
            "max_reconnect_attempts": -1 if reconnect else 0,
            "reconnect_time_wait": 0.5,
        }
        if nkey_seed:
            opts["nkeys_seed_str"] = nkey_seed
            opts["inbox_prefix"] = inbox_prefix(
                nkeys.from_seed(nkey_seed.encode()).public_key.decode()
            )

        denials: dict[str, str] = {}

        async def note(exc: Exception) -> None:
            # nats-py logs every failed attempt otherwise. A refused publish shows up only here
            # (the request itself just times out), so remember it for a precise error.
            # nats-py lower-cases the server's text, so subjects are compared lower-cased.
            text = str(exc).lower()
            if "permissions violation for publish to" in text:
                denials[text.split("publish to", 1)[1].strip().strip("'\"")] = text

        opts["error_cb"] = note
        servers: list[str] = opts["servers"]
        if not await any_reachable(servers, connect_timeout):
            # nats-py keeps retrying an initial connect for seconds; one TCP probe answers now.
            raise Unreachable(url, "connection refused")
        try:
            nc = await asyncio.wait_for(nats.connect(**opts), timeout=connect_timeout * 2 + 1)
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            raise Unreachable(url, str(exc) or type(exc).__name__) from None
        return cls(
            nc=nc,
            js=nc.jetstream(timeout=5.0),
            signer=signer,
            url=url,
            settings=settings or StreamSettings(),
            denials=denials,
            anchor=anchor,
        )

    async def close(self) -> None:
        if self.nc.is_closed:
            return
        # Not drain(): every append is awaited until acked, so there is nothing to drain, and
        # drain() waits up to 30 s for messages buffered in a follower nobody reads any more
        # (Ctrl-C on `events --follow` hung on it).
        if self.nc.is_connected:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await self.nc.flush(timeout=1)
        try:
            await self.nc.close()
        except (RuntimeError, OSError):
            # nats-py writes what it buffered to the old transport even when the server died
            # under it (uvloop: RuntimeError "the handler is closed"); the client is CLOSED by
            # then and nothing buffered can reach a dead server anyway.
            pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def stream(self) -> str:
        return self.settings.name

    # -- stream -------------------------------------------------------------------------------

    def stream_config(self) -> StreamConfig:
        s = self.settings
        return StreamConfig(
            name=s.name,
            subjects=[ALL_SUBJECTS],
            storage=StorageType.FILE,
            num_replicas=s.replicas,
            duplicate_window=s.duplicate_window_s,
            max_msgs=-1,
            max_bytes=-1,
            max_age=0,
            deny_delete=s.deny_delete,
            deny_purge=s.deny_delete,
            allow_direct=True,
            allow_atomic=True,
        )

    async def ensure_stream(self, placement_timeout: float = 15.0) -> None:
        """Create the stream, or leave an existing one as it is (idempotent).

        A cluster still forming (no meta leader yet, or one that has not yet heard from enough
        peers to place the replicas) is waited for up to `placement_timeout` seconds: `up --join`
        and a freshly started cluster race exactly there."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + placement_timeout
        while True:
            try:
                await self._create_stream_once()
                return
            except _ClusterForming as forming:
                if loop.time() > deadline:
                    raise StoreError(
                        f"cannot create stream {self.stream!r}: {forming} after "
                        f"{placement_timeout:.0f}s; check that enough JetStream servers are up "
                        f"for {self.settings.replicas} replicas"
                    ) from None
                await asyncio.sleep(0.25)

    async def _create_stream_once(self) -> None:
        try:
            await self.js.stream_info(self.stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError) as exc:
            raise _ClusterForming("JetStream not answering") from exc
        try:
            await self.js.add_stream(self.stream_config())
        except nats.js.errors.ServiceUnavailableError as exc:
            raise _ClusterForming("JetStream not answering") from exc
        except nats.js.errors.APIError as exc:
            if exc.err_code == _NO_SUITABLE_PEERS:
                raise _ClusterForming(str(exc.description)) from exc
            raise StoreError(f"cannot create stream {self.stream!r}: {exc.description}") from None
        except nats.errors.TimeoutError as exc:
            raise _ClusterForming("JetStream not answering") from exc

    async def last_seq(self) -> int:
        return await self._riding("read the stream's last sequence", self._last_seq_once)

    async def _last_seq_once(self) -> int:
        # Our request, not js.stream_info: nats-py's loses a cancel on Python 3.11 (`request`).
        subject = f"$JS.API.STREAM.INFO.{self.stream}"
        try:
            msg = await request(self.nc, subject, b"", try_timeout(self.timeout))
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            # No meta leader (an election) looks exactly like this; outside a ride-out scope
            # the caller gets nats-py's error as before.
            raise Leaderless(type(exc).__name__, exc) from None
        info = json.loads(msg.data)
        err = info.get("error")
        if err is not None:
            if err.get("err_code") == _STREAM_NOT_FOUND or err.get("code") == 404:
                raise StreamMissing(self.stream)
            if err.get("code") == 503:
                raise Leaderless(str(err.get("description", "")), StoreError(str(err)))
            nats.js.errors.APIError.from_error(err)  # raises the typed error
        return int(info["state"]["last_seq"])

    async def _riding(
        self, what: str, once: Callable[[], Awaitable[T]], *, quick_tries: int = 0
    ) -> T:
        """`retrying` for this store: a wait that ran out while no server was reachable at
        all says so, rather than blaming the election."""
        try:
            return await retrying(
                what, once, quick_tries=quick_tries, stream_missing=self._stream_missing
            )
        except NoLeader as exc:
            if self.nc.is_connected:
                raise
            raise NoLeader(what, exc.waited_s, f"no NATS server of {self.url} answers") from None

    async def _stream_missing(self) -> StreamMissing | None:
        """`StreamMissing` only when the server says the stream does not exist (not: no
        answer, which an election looks like too)."""
        subject = f"$JS.API.STREAM.INFO.{self.stream}"
        try:
            msg = await request(self.nc, subject, b"", min(self.timeout, 2.0))
            err = json.loads(msg.data).get("error") or {}
        except (nats.errors.Error, ValueError):
            return None
        return StreamMissing(self.stream) if err.get("err_code") == _STREAM_NOT_FOUND else None

    # -- append -------------------------------------------------------------------------------

    async def append(
        self,
        subject: str,
        events: Sequence[Event],
        expected: Version | int,
        *,
        correlation: str = "",
        causation: str = "",
        event_ids: Sequence[str] | None = None,
    ) -> Version:
        """Append events to one aggregate if it still stands at `expected`; returns its new version.

        Raises ConflictError when another writer got there first.
        """
        if isinstance(expected, int):
            expected = await self.version_at(subject, expected)
        result = await self.commit(
            [Change(subject, events, expected, event_ids)],
            correlation=correlation,
            causation=causation,
        )
        return result[subject]

    async def commit(
        self,
        changes: Sequence[Change],
        *,
        correlation: str = "",
        causation: str = "",
    ) -> dict[str, Version]:
        """Append to several aggregates atomically, each guarded by its expected version."""
        if not changes or not any(c.events for c in changes):
            raise ValueError("commit needs at least one event")
        if len({c.subject for c in changes}) != len(changes):
            raise ValueError("commit takes each subject once; put all its events in one Change")
        msgs: list[tuple[str, bytes, dict[str, str]]] = []
        now = time.time_ns()
        correlation = correlation or new_event_id()
        for change in changes:
            prev = change.expected.hash
            ids = change.event_ids or [new_event_id() for _ in change.events]
            if len(ids) != len(change.events):
                raise ValueError(
                    f"{change.subject}: {len(ids)} ids for {len(change.events)} events"
                )
            for i, (event, eid) in enumerate(zip(change.events, ids, strict=True)):
                data = seal(
                    self.signer,
                    event,
                    subject=change.subject,
                    event_id=eid,
                    time_ns=now,
                    correlation=correlation,
                    causation=causation,
                    prev=prev,
                )
                headers = {_H_MSGID: eid}
                if i == 0:
                    headers[_H_EXPECT] = str(change.expected.seq)
                msgs.append((change.subject, data, headers))
                prev = message_hash(data)
        try:
            if len(msgs) == 1:
                subj, data, headers = msgs[0]
                seq = await self._publish_one(subj, data, headers, changes[0].expected.seq)
                return {subj: Version(seq, prev)}  # prev: the hash of `data`, from the loop
            last_seq = await self._publish_batch(msgs, changes)
        except nats.errors.ConnectionClosedError:
            # Closed under us (shutdown racing an append): a typed store error, not nats-py's.
            raise StoreClosed(self.url, f"append to {msgs[0][0]}") from None
        return versions_after(msgs, last_seq)

    async def _send(self, subject: str, data: bytes, headers: dict[str, str]) -> int:
        """Publish and await the ack; raises like ``js.publish``.

        Acks come back on one shared wildcard subscription (`Acks`), not a request with
        ``asyncio.wait_for`` per message: the same protocol, ~25% less CPU per append when
        many are in flight (see bench.append).
        """
        if self._acks is None:
            self._acks = Acks(self.nc)
        return await self._acks.publish(subject, data, headers, try_timeout(self.timeout))

    async def _publish_one(
        self, subject: str, data: bytes, headers: dict[str, str], exp: int
    ) -> int:
        # Every try sends the same bytes and Nats-Msg-Id: a try that was stored but whose ack
        # got lost comes back as a duplicate (its first sequence) or, since nats-server checks
        # the expected sequence before Msg-Id dedupe, as a wrong-sequence error that
        # `_landed_after` recognises as our own append.
        async def once() -> int:
            try:
                return await self._send(subject, data, headers)
            except nats.js.errors.APIError as exc:
                if exc.err_code == _WRONG_LAST_SEQ:
                    landed = await self._landed_after(subject, exp, data, exc.description or "")
                    if landed is not None:
                        return landed
                if exc.code == 503:
                    raise Leaderless(str(exc.description), StoreError(str(exc))) from None
                raise self._api_error(
                    exc.err_code or 0, exc.description or "", subject, exp
                ) from None
            except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
                if subject.lower() in self.denials:
                    raise PermissionDenied(subject) from None
                why = f"append to {subject} got no answer: {type(exc).__name__}"
                no_stream = isinstance(exc, nats.js.errors.NoStreamResponseError)
                raise Leaderless(
                    type(exc).__name__, StoreError(why), maybe_missing=no_stream
                ) from None

        return await self._riding(f"append to {subject}", once, quick_tries=self.retries)

    async def _landed_after(self, subject: str, exp: int, data: bytes, desc: str) -> int | None:
        """The sequence of `data` if it is the first message of `subject` after `exp`: an
        earlier try of this very append landed (same bytes: same event id, signature, time).
        None: another writer took that place, or `exp` is past the subject's last message (a
        real conflict). Raises `Leaderless` when the replica answering has nothing after `exp`
        yet though the leader that refused us has: the replica lags."""
        after, _ = await self._direct_batch(subject, exp + 1, 1)
        if not after:
            on_leader = _LEADER_LAST.search(desc)  # "wrong last sequence: 81"
            if on_leader is None or int(on_leader.group(1)) <= exp:
                return None
            raise Leaderless(
                f"{subject} moved past {exp} on the leader but not yet on this replica",
                ConflictError(subject, exp, desc),
            )
        return after[0].seq if after[0].data == data else None

    async def _publish_batch(
        self, msgs: list[tuple[str, bytes, dict[str, str]]], changes: Sequence[Change]
    ) -> int:
        tries = 0

        async def once() -> int:
            nonlocal tries
            tries += 1
            batch_id = new_event_id()  # a fresh batch per try; the msg ids still dedupe
            try:
                for i, (subj, data, headers) in enumerate(msgs, 1):
                    h = dict(headers, **{"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i)})
                    if i < len(msgs):
                        await self.nc.publish(subj, data, headers=h)
                    else:
                        h["Nats-Batch-Commit"] = "1"
                        reply = await request(self.nc, subj, data, try_timeout(self.timeout), h)
                resp = json.loads(reply.data)
            except nats.errors.NoRespondersError:
                raise Leaderless(
                    "no responders", StreamMissing(self.stream), maybe_missing=True
                ) from None
            except nats.errors.TimeoutError:
                denied = next((m[0] for m in msgs if m[0].lower() in self.denials), None)
                if denied is not None:
                    raise PermissionDenied(denied) from None
                raise Leaderless(
                    "no answer", StoreError("atomic append got no answer; check the NATS server")
                ) from None
            err = resp.get("error")
            if err is None:
                return int(resp["seq"])
            code, desc = int(err.get("err_code", 0)), str(err.get("description", ""))
            first = next(c for c in changes if c.events)
            if code == _WRONG_LAST_SEQ or (code == _BATCH_DUP_ID and tries > 1):
                landed = await self._already_committed(msgs, first)
                if landed is not None:
                    return landed
            if code == _BATCH_DUP_ID and tries > 1:  # our ids were stored: the replica lags
                raise Leaderless(
                    "a replica lags the leader",
                    ConflictError(
                        first.subject, first.expected.seq, "batch retry saw other writes"
                    ),
                )
            subject = first.subject
            if code == _WRONG_LAST_SEQ:
                # The server does not say which subject moved; find it, for a precise error.
                moved = await self._moved_subject(changes)
                if moved is None:  # this replica lags the leader that refused us: look again
                    raise Leaderless(
                        "a replica lags the leader",
                        ConflictError(first.subject, first.expected.seq, desc),
                    )
                subject = moved
                exp = next(c.expected.seq for c in changes if c.subject == subject)
                raise ConflictError(subject, exp, desc)
            if int(err.get("code", 0)) == 503:
                raise Leaderless(desc, StoreError(f"atomic append refused: {desc}"))
            raise self._api_error(code, desc, subject, 0)

        return await self._riding("atomic append", once, quick_tries=self.retries)

    async def _already_committed(
        self, msgs: list[tuple[str, bytes, dict[str, str]]], first: Change
    ) -> int | None:
        """The last sequence of this batch if an earlier try stored it, else None. Atomic: all
        of it was stored, its first message right after the first change's expected sequence
        (other writers may have appended since)."""
        after, _ = await self._direct_batch(first.subject, first.expected.seq + 1, 1)
        if after and after[0].data == msgs[0][1]:
            return after[0].seq + len(msgs) - 1
        return None

    async def _moved_subject(self, changes: Sequence[Change]) -> str | None:
        for c in changes:
            last = await self.last_by_subject(c.subject)
            if (last.seq if last else 0) != c.expected.seq:
                return c.subject
        return None

    def _api_error(self, code: int, desc: str, subject: str, exp: int) -> StoreError:
        if code == _WRONG_LAST_SEQ:
            return ConflictError(subject, exp, desc)
        if code == _STREAM_NOT_FOUND:
            return StreamMissing(self.stream)
        return StoreError(f"append to {subject} refused: {desc} (code {code})")

    # -- read ---------------------------------------------------------------------------------

    async def _direct_get(self, ask: dict[str, Any], what: str) -> Recorded | None:
        """One message by a direct get (None: no such message). Our request, not
        js.get_msg: nats-py's loses a cancel on Python 3.11 (see `request`)."""
        return await self._riding(
            f"read {what}",
            lambda: self._direct_get_once(ask, what),
        )

    async def _direct_get_once(self, ask: dict[str, Any], what: str) -> Recorded | None:
        subj = f"$JS.API.DIRECT.GET.{self.stream}"
        try:
            msg = await request(self.nc, subj, json.dumps(ask).encode(), try_timeout(self.timeout))
        except nats.errors.NoRespondersError as exc:
            # Replicas stop serving direct gets while their stream has no leader.
            raise Leaderless("no responders", exc, maybe_missing=True) from None
        except nats.errors.TimeoutError as exc:
            raise Leaderless("no answer", exc) from None
        hdrs = msg.headers or {}
        status = hdrs.get("Status", "")
        if status == "404":
            return None
        if status:
            failed = StoreError(f"read {what} failed: {hdrs.get('Description', status)}")
            if status == "408" or status.startswith("5"):
                raise Leaderless(f"status {status}", failed, maybe_missing=status == "503")
            raise failed
        return Recorded(int(hdrs["Nats-Sequence"]), hdrs.get("Nats-Subject", ""), msg.data)

    async def last_by_subject(self, subject: str) -> Recorded | None:
        got = await self._direct_get({"last_by_subj": subject}, subject)
        if got is None:
            return None
        return Recorded(seq=got.seq, subject=got.subject or subject, data=got.data)

    async def version_at(self, subject: str, seq: int) -> Version:
        """The version of `subject` if its last event is at `seq` (hash looked up on the server)."""
        if seq == 0:
            return NEW
        got = await self._direct_get({"seq": seq}, subject)
        if got is None:
            raise ConflictError(subject, seq, f"no message at sequence {seq}")
        if got.subject != subject:
            raise ConflictError(subject, seq, f"sequence {seq} belongs to {got.subject}")
        return Version(seq, message_hash(got.data))

    async def read_aggregate(self, subject: str, after: int = 0) -> tuple[list[Recorded], Version]:
        """Every event of one aggregate (after stream seq `after`), and its current version.

        Uses batched direct gets (no consumer to create), so a decide loop costs one round trip
        per ~256 events.
        """
        out: list[Recorded] = []
        start = after + 1
        while True:
            batch, pending = await self._direct_batch(subject, start, 256)
            out.extend(batch)
            if not batch or pending == 0:
                break
            start = batch[-1].seq + 1
        if out:
            return out, Version(out[-1].seq, message_hash(out[-1].data))
        if after:
            return out, await self.version_at(subject, after)
        return out, NEW

    async def _direct_batch(
        self, subject: str, start: int, n: int, *, start_time: float | None = None
    ) -> tuple[list[Recorded], int]:
        return await self._riding(
            f"read {subject}",
            lambda: self._direct_batch_once(subject, start, n, start_time=start_time),
        )

    async def _direct_batch_once(
        self, subject: str, start: int, n: int, *, start_time: float | None = None
    ) -> tuple[list[Recorded], int]:
        inbox = self.nc.new_inbox()
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def collect(msg: Msg) -> None:
            await queue.put(msg)

        sub = await self.nc.subscribe(inbox, cb=collect)
        try:
            ask: dict[str, Any] = {"seq": start, "next_by_subj": subject, "batch": n}
            if start_time is not None:
                from datetime import UTC, datetime

                del ask["seq"]
                ask["start_time"] = datetime.fromtimestamp(start_time, UTC).isoformat()
            req = json.dumps(ask).encode()
            await self.nc.publish(f"$JS.API.DIRECT.GET.{self.stream}", req, reply=inbox)
            out: list[Recorded] = []
            pending = 0
            while True:
                async with asyncio.timeout(try_timeout(self.timeout)):  # read(): keeps a cancel
                    msg = await queue.get()
                hdrs = msg.headers or {}
                status = hdrs.get("Status", "")
                if status == "404":
                    return out, 0
                if status == "503":  # no stream, or (replicas stop serving) no leader
                    raise Leaderless("no responders", StreamMissing(self.stream),
                                     maybe_missing=True)  # fmt: skip
                if status == "408" or status.startswith("5"):
                    failed = StoreError(f"read {subject} failed: {hdrs.get('Description', status)}")
                    raise Leaderless(f"status {status}", failed)
                if status == "204":  # end of batch
                    return out, pending
                if status:
                    raise StoreError(f"read {subject}: unexpected status {status}")
                pending = int(hdrs.get("Nats-Num-Pending", "0"))
                out.append(
                    Recorded(
                        int(hdrs["Nats-Sequence"]),
                        hdrs.get("Nats-Subject", subject),
                        msg.data,
                        stamp(msg),
                    )
                )
        except nats.errors.NoRespondersError:
            raise Leaderless(
                "no responders", StreamMissing(self.stream), maybe_missing=True
            ) from None
        except TimeoutError:
            failed = StoreError(f"read {subject}: no answer from the server")
            raise Leaderless("no answer", failed) from None
        finally:
            await sub.unsubscribe()

    async def read(
        self,
        *,
        subject: str = ALL_SUBJECTS,
        from_seq: int = 1,
        from_time: float | None = None,
        follow: bool = False,
        until_seq: int | None = None,
    ) -> AsyncIterator[Recorded]:
        """Every stored message in order; with `follow`, then new ones too.

        Batched direct gets, no consumer: a reader needs no right to create one (a role
        allowed to create unnamed consumers could also rewrite any durable consumer through
        that API, e.g. empty the scheduler's filter). Following waits on a plain subscription
        to the subjects (a wake-up only; the messages come from the stream), polling too."""
        stop = until_seq
        if not follow and stop is None:
            stop = await self.last_seq()
            if stop == 0:
                return
        start = max(from_seq, 1)
        if from_time is not None:
            first, _ = await self._direct_batch(subject, 0, 1, start_time=from_time)
            if not first and not follow:
                return
            start = first[0].seq if first else (await self.last_seq()) + 1
        if stop is not None and start > stop:
            return
        wake = asyncio.Event()
        sub = None
        if follow:

            async def ping(_msg: Msg) -> None:
                wake.set()

            sub = await self.nc.subscribe(subject, cb=ping)
        try:
            while True:
                wake.clear()
                batch, pending = await self._direct_batch(subject, start, _READ_BATCH)
                for rec in batch:
                    if stop is not None and rec.seq > stop:
                        return
                    yield rec
                    if stop is not None and rec.seq >= stop:
                        return
                if batch:
                    start = batch[-1].seq + 1
                    if pending:
                        continue
                if not follow:
                    return
                # woken by a publish (stored by now, or at the next poll), else poll.
                # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when
                # the wake-up and a cancel arrive together, losing the cancel, and a follower
                # cancelled at shutdown then polls forever (a dashboard test's teardown hung).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_FOLLOW_POLL_S):
                        await wake.wait()
                if wake.is_set():
                    await asyncio.sleep(0.01)
        finally:
            if sub is not None:
                await sub.unsubscribe()

    async def durable(
        self,
        name: str,
        subjects: Iterable[str],
        *,
        ack_wait_s: float = 30.0,
        max_deliver: int = 20,
    ) -> JetStreamContext.PullSubscription:
        """A durable pull consumer for an actor: survives restarts, redelivers unacked events."""
        cfg = ConsumerConfig(
            durable_name=name,
            filter_subjects=list(subjects),
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait_s,
            max_deliver=max_deliver,
            max_ack_pending=10_000,
        )
        try:
            await self.js.add_consumer(self.stream, cfg)
        except nats.errors.TimeoutError:
            raise StoreError(f"creating consumer {name!r}: no answer from the server") from None
        except nats.js.errors.NotFoundError:
            raise StreamMissing(self.stream) from None
        return await self.js.pull_subscribe_bind(durable=name, stream=self.stream)
