"""The actor runtime: a durable pull consumer plus a level-triggered reconcile loop.

An actor names its durable consumer and subjects, handles one verified event at a time and
can reconcile (compare what the log wants with what has been done, and do the rest)::

    class Echo:
        name = "echo"
        subjects = ("dstack.vm.*",)

        async def handle(self, d: Delivery) -> None: ...
        async def reconcile(self) -> int: return 0

    async with ActorRunner(store, Echo(), RuntimeConfig()) as runner:
        await runner.wait()          # until runner.stop() (e.g. on SIGTERM) or cancellation

Delivery is at least once: a message is acked only after ``handle`` returned, so handlers
check the aggregate before deciding, and optimistic appends turn a duplicate decision into a
conflict that the handler resolves by re-reading. A handler failure naks the message with a
growing delay; a malformed message is logged with its sequence, counted in
``pydstack_actor_malformed_total{actor,reason}`` and terminated, so it never blocks the
actor. A well-formed event the write policy refuses (an unknown or revoked signer, a role or
host writing what it may not; ``pydstack.core.policy``) is terminated the same way and counted
in ``pydstack_events_refused_total{actor,reason}``: handlers only see events that count.
Reconcile runs at start and every ``reconcile_interval_s``; that, not redelivery, is what makes
a crash at any point safe.

Consumption is batched: one pull asks for up to ``batch`` messages, which are handled one after
the other in stream order, and the acks of the handled ones are sent together (back to back,
in one socket write) at the end of the batch, or sooner once the oldest has waited
``ack_every_s``. While a batch is handled the next one is already being pulled, so the
server's delivery overlaps the handlers. A crash before the acks leaves them unacked, so they
are delivered again: still at least once, a few more duplicates, never a loss. On stop, what
was handled is acked and what was not (the rest of the batch and the batch pulled ahead) is
handed back (nak'd) for another instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

import nats.errors
import structlog
from nats.aio.msg import Msg

from pydstack.adapters.nats import EventStore
from pydstack.core.events import AnyEvent, Envelope

from . import metrics
from .decode import Malformed, decode_message
from .trust import Judge


@dataclass(frozen=True, slots=True)
class Delivery:
    """One verified event as a handler sees it."""

    seq: int
    subject: str
    envelope: Envelope
    event: AnyEvent
    data: bytes
    delivered: int = 1  # how many times the server has delivered it (1 = first time)


class Actor(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def subjects(self) -> Sequence[str]: ...

    async def handle(self, delivery: Delivery) -> None:
        """Act on one event; raise to have it redelivered later (after a delay)."""

    async def reconcile(self) -> int:
        """Do whatever the log wants and is not done yet; returns how many things it did."""


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    batch: int = 256  # messages per pull; their acks go out together after the batch
    ack_every_s: float = 0.5  # send the acks sooner when a batch is slow (< ack_wait_s)
    fetch_timeout_s: float = 1.0
    reconcile_interval_s: float = 10.0
    nak_delay_s: float = 0.5  # first redelivery delay; doubles per delivery up to max
    nak_max_delay_s: float = 30.0
    ack_wait_s: float = 30.0
    max_deliver: int = 20
    check_signatures: bool = True
    shutdown_grace_s: float = 10.0  # how long the in-flight message may take after a stop


class ActorRunner:
    """Runs one actor until stopped; owns its consumer subscription."""

    def __init__(self, store: EventStore, actor: Actor, config: RuntimeConfig | None = None):
        self.store = store
        self.actor = actor
        self.config = config or RuntimeConfig()
        self.log = structlog.get_logger("pydstack.actor").bind(actor=actor.name)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reconcile_now = asyncio.Event()
        self._to_ack: list[Msg] = []  # handled, ack not sent yet (see _send_acks)
        self._unhandled: list[Msg] = []  # pulled, not handled yet (handed back on stop)
        # Set per handled event: looked up once (a labels() lookup per event is measurable).
        name = actor.name
        self._gauges = (
            metrics.HANDLED.labels(name),
            metrics.LAST_SEQ.labels(name),
            metrics.LAG.labels(name),
        )
        self._oldest_unacked = 0.0
        # The consumer sees some subjects only: the judge loads the keyring (and a VM's history
        # when the owner rule needs it) before judging a delivered event.
        self.judge = Judge(actor.name, store.anchor, verify=self.config.check_signatures)

    # -- lifecycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop fetching; the message in flight is finished, then the runner returns."""
        self._stopping.set()

    def reconcile_soon(self) -> None:
        """Run a reconcile pass before the next fetch (e.g. after an adapter noticed drift)."""
        self._reconcile_now.set()

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self.run(), name=f"actor-{self.actor.name}")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if self._task is None:
            return
        # asyncio.wait, not wait_for: the runner's own failure may itself be a TimeoutError
        # (nats-py's are), which must not be mistaken for the grace period running out.
        done, _ = await asyncio.wait({self._task}, timeout=self.config.shutdown_grace_s + 2)
        if not done:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            return
        failure = None if self._task.cancelled() else self._task.exception()
        if failure is not None:
            if et is None:
                raise failure
            # Already unwinding for another reason: that is the cause; log this one.
            self.log.warning("actor failed while stopping", error=str(failure))

    async def wait(self) -> None:
        """Wait for the runner started by ``async with`` to end; re-raises its failure."""
        if self._task is not None:
            # Shielded: cancelling whoever waits must not cancel the runner itself (it has its
            # own graceful stop()).
            await asyncio.shield(self._task)

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        sub = await self.store.durable(
            self.actor.name,
            self.actor.subjects,
            ack_wait_s=cfg.ack_wait_s,
            max_deliver=cfg.max_deliver,
        )
        self.log.info("actor started", subjects=list(self.actor.subjects))
        loop = asyncio.get_running_loop()
        next_reconcile = 0.0
        # While a batch is handled, the next one is already being pulled (when the last pull
        # was not empty): the server's delivery overlaps the handlers instead of adding to them.
        ahead: asyncio.Future[list[Msg]] | None = None
        try:
            while not self._stopping.is_set():
                if loop.time() >= next_reconcile or self._reconcile_now.is_set():
                    self._reconcile_now.clear()
                    await self._reconcile(sub)
                    next_reconcile = loop.time() + cfg.reconcile_interval_s
                batch = await (ahead if ahead is not None else self._fetch(sub))
                ahead = None
                self._unhandled = batch
                if self._stopping.is_set() or not batch:
                    continue
                await self._load_keyring(batch)
                ahead = asyncio.ensure_future(self._fetch(sub))
                await self._finish(batch)
                if not self._stopping.is_set():  # else confirmed below, before handing back
                    await self._send_acks()
        finally:
            self._stopping.set()  # a pull still in flight returns now, with what it got
            if ahead is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    self._unhandled = [*self._unhandled, *await ahead]
            await self._send_acks(confirm=True)
            await self._hand_back(sub, self._unhandled)
            self.log.info("actor stopped")

    async def _send_acks(self, *, confirm: bool = False) -> None:
        """Ack every handled message not acked yet. Each ack is a plain publish with no reply
        awaited: sent back to back, the client writes them to the socket together, instead of
        one write (and one wake-up of the server) per event. ``confirm`` (on stop): the last
        one waits for the server's reply, so all are applied when the runner returns (the
        server takes one consumer's acks in order)."""
        msgs, self._to_ack = self._to_ack, []
        for i, msg in enumerate(msgs):
            with contextlib.suppress(Exception):  # unacked: delivered again, handled again
                if confirm and i == len(msgs) - 1:
                    await msg.ack_sync(timeout=2)
                else:
                    await msg.ack()

    async def _hand_back(self, sub: Any, unhandled: list[Msg]) -> None:
        """Unsubscribe, then nak what was delivered but not handled, so another instance can
        take it now instead of after ``ack_wait``. Unsubscribing first matters: a pull request
        still open on the server would otherwise receive the nak'd message again."""
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        # Messages the open pull request delivered after the last fetch returned wait in the
        # subscription's queue; nats-py has no public way to take them, hence the private read.
        queue = getattr(getattr(sub, "_sub", None), "_pending_queue", None)
        while queue is not None and not queue.empty():
            msg = queue.get_nowait()
            if msg.reply and msg.reply.startswith("$JS.ACK."):
                unhandled.append(msg)
        for msg in unhandled:
            with contextlib.suppress(Exception):
                await msg.nak()
        with contextlib.suppress(Exception):
            await self.store.nc.flush(timeout=2)

    async def _fetch(self, sub: Any) -> list[Msg]:
        fetch = asyncio.ensure_future(sub.fetch(self.config.batch, self.config.fetch_timeout_s))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not fetch.done():  # stopping: a pull caught mid-delivery keeps what it got
                await asyncio.wait({fetch}, timeout=0.05)
        finally:
            for t in (fetch, stop):
                if not t.done():
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
        if not fetch.done() or fetch.cancelled():
            return []
        exc = fetch.exception()
        if exc is None:
            msgs: list[Msg] = fetch.result()
            return msgs
        if isinstance(exc, nats.errors.TimeoutError | TimeoutError):
            return []
        if self.store.nc.is_closed:
            raise exc
        metrics.ERRORS.labels(self.actor.name, "fetch").inc()
        self.log.warning("fetch failed; retrying", error=str(exc) or type(exc).__name__)
        await asyncio.sleep(min(self.config.fetch_timeout_s, 1.0))
        return []

    async def _load_keyring(self, batch: list[Msg]) -> None:
        """One keyring read per batch at most (none when it holds nothing newer)."""
        if not batch:
            return
        try:
            await self.judge.load_keyring(self.store, int(batch[-1].metadata.sequence.stream))
        except Exception as exc:  # judged per message below, which retries the read
            metrics.ERRORS.labels(self.actor.name, "keyring").inc()
            self.log.warning("keyring read failed", error=str(exc) or type(exc).__name__)

    async def _finish(self, batch: list[Msg]) -> None:
        """Handle a batch in order until stopped; the message in flight is finished even if
        the runner is cancelled meanwhile (bounded by grace). What is left stays in
        ``_unhandled``."""
        task = asyncio.ensure_future(self._process_batch(batch))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            self._stopping.set()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, self.config.shutdown_grace_s)
            raise

    async def _process_batch(self, batch: list[Msg]) -> None:
        loop = asyncio.get_running_loop()
        for i, msg in enumerate(batch):
            if self._stopping.is_set():
                return
            self._unhandled = batch[i + 1 :]
            await self._process(msg)
            if self._to_ack and loop.time() - self._oldest_unacked >= self.config.ack_every_s:
                await self._send_acks()

    async def _process(self, msg: Msg) -> None:
        name = self.actor.name
        meta = msg.metadata
        seq = int(meta.sequence.stream)
        delivered = int(meta.num_delivered)
        try:
            env, event = decode_message(
                msg.subject, msg.data, check_signature=self.config.check_signatures
            )
        except Malformed as bad:
            metrics.MALFORMED.labels(name, bad.reason).inc()
            self.log.warning(
                "malformed message skipped",
                subject=msg.subject,
                seq=seq,
                reason=bad.reason,
                detail=bad.detail,
            )
            await msg.term()
            return
        try:
            ok = await self.judge.admit_read(self.store, seq, msg.subject, msg.data, opened=env)
        except Exception as exc:  # the keyring or the VM's history could not be read
            metrics.ERRORS.labels(name, "keyring").inc()
            self.log.warning("cannot judge the event yet; redelivered later", seq=seq,
                             error=str(exc) or type(exc).__name__)  # fmt: skip
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.config.nak_delay_s)
            return
        if ok is None:  # refused by the write policy: counted and logged by the judge
            await msg.term()
            return
        ctx = {
            "subject": msg.subject,
            "seq": seq,
            "correlation": env.correlation,
            "event": env.type,
            "event_id": env.id,
        }
        with structlog.contextvars.bound_contextvars(actor=name, **ctx):
            started = time.perf_counter()
            try:
                await self.actor.handle(Delivery(seq, msg.subject, env, event, msg.data, delivered))
            except Exception as exc:
                metrics.ERRORS.labels(name, "handler").inc()
                delay = min(
                    self.config.nak_delay_s * 2 ** (delivered - 1), self.config.nak_max_delay_s
                )
                self.log.warning(
                    "handler failed; will be redelivered",
                    error=str(exc),
                    error_type=type(exc).__name__,
                    delivered=delivered,
                    retry_in_s=delay,
                )
                with contextlib.suppress(Exception):
                    await msg.nak(delay=delay)
                return
            if not self._to_ack:
                self._oldest_unacked = asyncio.get_running_loop().time()
            self._to_ack.append(msg)  # acked with the rest of its batch (_send_acks)
            handled, last_seq, lag = self._gauges
            handled.inc()
            last_seq.set(seq)
            lag.set(int(meta.num_pending))
            self.log.debug("handled", ms=round((time.perf_counter() - started) * 1000, 2))

    async def _reconcile(self, sub: Any) -> None:
        name = self.actor.name
        started = time.perf_counter()
        try:
            with structlog.contextvars.bound_contextvars(actor=name):
                done = await self.actor.reconcile()
        except Exception as exc:
            metrics.ERRORS.labels(name, "reconcile").inc()
            self.log.warning(
                "reconcile failed; next pass will retry",
                error=str(exc),
                error_type=type(exc).__name__,
            )
            return
        metrics.RECONCILES.labels(name).inc()
        lag: int | None = None
        with contextlib.suppress(Exception):
            info = await sub.consumer_info()
            lag = int(info.num_pending) + int(info.num_ack_pending)
            metrics.LAG.labels(name).set(lag)
        self.log.info(
            "reconciled", acted=done, lag=lag, ms=round((time.perf_counter() - started) * 1000, 1)
        )
