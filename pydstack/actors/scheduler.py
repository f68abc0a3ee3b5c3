"""The scheduler: places every ``VmRequested`` on a host with room, or rejects it with a reason.

It folds hosts and undecided VMs from the log (:class:`PlacementView`), decides with the pure
:func:`~pydstack.core.projections.decide_placement`, and writes the outcome as ONE atomic
commit guarded on both aggregates::

    dstack.host.<h>  HostVmPlaced   expected = the host version it folded
    dstack.vm.<id>   VmScheduled    expected = the VM version it folded

so two schedulers can neither over-commit a host or reuse a CID (host guard) nor schedule a
VM twice (VM guard). A lost race is a ``ConflictError``: read the log again, decide again.
A ``VmRejected`` is written only after catching up with the whole stream. Usage::

    scheduler = Scheduler(store, SchedulerConfig(name="scheduler-1"))
    async with ActorRunner(store, scheduler, RuntimeConfig()) as runner:
        await runner.wait()

or as a process: ``python -m pydstack.actors.scheduler --nats nats://127.0.0.1:4222``.

With ``SchedulerConfig.checkpoint`` (a file path) the view is kept in SQLite: the first
catch-up resumes from it when it is sound and still matches the log, and folds only what
follows; otherwise it folds the whole log (``_scheduler_checkpoint`` says what is checked).
The view is written back at most every ``checkpoint_every_s`` after a catch-up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import structlog

from pydstack.adapters.nats import Change, ConflictError, EventStore, StoreError, Version
from pydstack.adapters.nats.identity import load_anchor
from pydstack.adapters.nats.store import new_event_id
from pydstack.core.events import (
    HostVmPlaced,
    Signer,
    VmRejected,
    VmRequested,
    VmScheduled,
    kind_filter,
    parse_subject,
    subject,
)
from pydstack.core.projections import Applied, decide_placement

from . import _scheduler_checkpoint as checkpoints
from . import metrics
from ._placement_view import HostDefaults, PlacementView
from .runtime import ActorRunner, Delivery, RuntimeConfig
from .trust import Judge

__all__ = ["Contended", "HostDefaults", "Plan", "Scheduler", "SchedulerConfig", "main"]

SUBJECTS: Final = (kind_filter("vm"), kind_filter("host"))
Outcome = Literal["scheduled", "rejected", "noop"]
_log = structlog.get_logger("pydstack.scheduler")


class Contended(StoreError):
    """Every attempt lost an optimistic race; the VM is retried later (redelivery/reconcile)."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    name: str = "scheduler"  # also the durable consumer name: instances sharing it share work
    defaults: HostDefaults = field(default_factory=HostDefaults)
    max_attempts: int = 12
    retry_base_s: float = 0.005  # jittered backoff after a conflict: U(0, base * 2**attempt)
    retry_max_s: float = 0.25
    max_silence_s: float | None = None  # skip hosts without a heartbeat for this long
    check_signatures: bool = True
    checkpoint: Path | None = None  # SQLite file of the view (None: fold the log at start)
    checkpoint_every_s: float = 2.0  # at least; 0: after every catch-up that moved the cursor


@dataclass(frozen=True, slots=True)
class Plan:
    """What one scheduler would append for one VM, and the versions it folded."""

    vm_id: str
    decision: HostVmPlaced | VmRejected
    vm_version: Version
    host_version: Version | None  # of the chosen host (placement only)
    request_id: str
    correlation: str


class Scheduler:
    """The scheduler actor (see the module doc); handlers are idempotent."""

    subjects: Sequence[str] = SUBJECTS

    def __init__(self, store: EventStore, config: SchedulerConfig | None = None) -> None:
        self.store = store
        self.config = config or SchedulerConfig()
        self.view = PlacementView(
            self.config.defaults,
            self.config.check_signatures,
            judge=Judge(self.config.name, store.anchor),
        )
        self._lock = asyncio.Lock()
        self.checkpoint = None
        if self.config.checkpoint is not None:
            self.checkpoint = checkpoints.open_checkpoint(
                self.config.checkpoint, self.config.name, store.signer
            )
        self._resumed = False
        self._saved = (0, 0.0)  # (cursor, monotonic time) of the last checkpoint written
        self._save_cost = 0.0  # seconds the last write took

    @property
    def name(self) -> str:
        return self.config.name

    # -- the actor protocol -------------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> None:
        async with self._lock:
            if delivery.seq > self.view.cursor:
                await self.catch_up()
            kind, agg_id = parse_subject(delivery.subject)
            if kind == "vm" and agg_id in self.view.pending:
                await self._schedule(agg_id)

    async def reconcile(self) -> int:
        """Decide every VM the log has requested and nobody has decided (level-triggered)."""
        acted = 0
        async with self._lock:
            await self.catch_up()
            for vm_id in list(self.view.pending):
                try:
                    if await self._schedule(vm_id) != "noop":
                        acted += 1
                except Contended as exc:
                    _log.warning(
                        "vm still contended; next pass retries", vm_id=vm_id, error=str(exc)
                    )
        return acted

    # -- steps (public so tests can interleave two schedulers) --------------------------------

    async def catch_up(self) -> None:
        """Fold everything stored since the cursor (first resuming from the checkpoint)."""
        if not self._resumed:
            await self._resume()
        last = await self.store.last_seq()
        if last <= self.view.cursor:
            return
        # fold moves the cursor to each record it reads, and no further: a direct get served
        # by a lagging cluster replica may end the read short of `last`, and jumping there
        # would skip those events for good (as e05b9b4 fixed in the VMM and gateway views).
        async for rec in self.store.read(from_seq=self.view.cursor + 1, until_seq=last):
            self.view.fold((rec,))
        await self._save_checkpoint()

    async def _resume(self) -> None:
        self._resumed = True
        if self.checkpoint is None:
            return
        cfg = self.config
        judge = Judge(cfg.name, self.store.anchor)
        view, why = await checkpoints.resume(
            self.store, self.checkpoint, cfg.defaults, cfg.check_signatures, judge
        )
        if view is None:
            log = _log.info if why == "missing" else _log.warning
            log("checkpoint not used; folding the whole log", reason=why)
            return
        _log.info("resumed from checkpoint", seq=view.cursor, hosts=len(view.hosts),
                  pending=len(view.pending))  # fmt: skip
        self.view = view
        self._saved = (view.cursor, time.monotonic())

    async def _save_checkpoint(self) -> None:
        seq, at = self._saved
        now = time.monotonic()
        if self.checkpoint is None or self.view.cursor <= seq:
            return
        # The whole view is rewritten each time: at least 20 times its cost apart (<= 5 %),
        # unless every_s is 0 (after every catch-up: tests).
        every = self.config.checkpoint_every_s
        if every > 0:
            every = max(every, 20 * self._save_cost)
        if now - at < every and self.view.cursor - seq < 100_000:
            return
        await checkpoints.save(self.checkpoint, self.view)
        self._saved = (self.view.cursor, now)
        self._save_cost = time.monotonic() - now

    def plan(self, vm_id: str) -> Plan | None:
        """The decision for an undecided VM on the current view; None if nothing to decide."""
        pending = self.view.pending.get(vm_id)
        if pending is None:
            return None
        vm = pending.vm
        decision: HostVmPlaced | VmRejected
        if vm.desired == "removed":
            decision = VmRejected(vm_id=vm_id, reason="removed before it was scheduled")
        else:
            request = VmRequested(
                vm_id=vm_id,
                app_id=vm.app_id,
                name=vm.name,
                resources=vm.resources,
                ports=vm.requested_ports,
                host=vm.pinned_host,
            )
            silence = self.config.max_silence_s
            decision = decide_placement(
                self.view.hosts,
                request,
                now_ns=time.time_ns() if silence is not None else None,
                max_silence_ns=int(silence * 1e9) if silence is not None else None,
            )
        host_version = None
        if isinstance(decision, HostVmPlaced):
            host_version = self.view.host_versions[subject("host", decision.host_id)]
        return Plan(
            vm_id, decision, pending.version, host_version, pending.request_id, pending.correlation
        )

    async def execute(self, plan: Plan) -> Outcome:
        """Append the plan's outcome; raises ConflictError if either aggregate moved."""
        vm_subject = subject("vm", plan.vm_id)
        trace = {"correlation": plan.correlation, "causation": plan.request_id}
        d = plan.decision
        if isinstance(d, VmRejected):
            await self.store.append(vm_subject, [d], plan.vm_version, **trace)
            self.view.mark_decided(plan.vm_id)
            metrics.DECISIONS.labels(self.name, "rejected").inc()
            _log.info("vm rejected", vm_id=plan.vm_id, reason=d.reason, **trace)
            return "rejected"
        assert plan.host_version is not None
        host_subject = subject("host", d.host_id)
        held = self.view.hosts[d.host_id].placements.get(plan.vm_id)
        placed_id = held.event if held is not None else new_event_id()
        scheduled = VmScheduled(
            vm_id=plan.vm_id, host=d.host_id, cid=d.cid, ports=d.ports, placement_event=placed_id
        )
        if held is not None:  # the room is already reserved for this VM: just record it
            await self.store.append(vm_subject, [scheduled], plan.vm_version, **trace)
        else:
            versions = await self.store.commit(
                [
                    Change(host_subject, [d], plan.host_version, [placed_id]),
                    Change(vm_subject, [scheduled], plan.vm_version),
                ],
                **trace,
            )
            hv = versions[host_subject]
            self.view.place(host_subject, Applied(hv.seq, time.time_ns(), d, placed_id), hv)
        self.view.mark_decided(plan.vm_id)
        metrics.DECISIONS.labels(self.name, "scheduled").inc()
        _log.info(
            "vm scheduled",
            vm_id=plan.vm_id,
            host=d.host_id,
            cid=d.cid,
            ports=[p.host_port for p in d.ports],
            **trace,
        )
        return "scheduled"

    async def schedule(self, vm_id: str) -> Outcome:
        """Decide one VM now (catching up first); "noop" if it is already decided or unknown."""
        async with self._lock:
            await self.catch_up()
            return await self._schedule(vm_id)

    async def _schedule(self, vm_id: str) -> Outcome:
        cfg = self.config
        fresh = False  # a rejection is final, so it is decided on the newest log, not a cache
        for attempt in range(cfg.max_attempts):
            plan = self.plan(vm_id)
            if plan is None:
                return "noop"
            if isinstance(plan.decision, VmRejected) and not fresh:
                await self.catch_up()
                fresh = True
                plan = self.plan(vm_id)
                if plan is None:
                    return "noop"
            try:
                return await self.execute(plan)
            except ConflictError as exc:
                metrics.DECISIONS.labels(self.name, "conflict").inc()
                _log.debug(
                    "lost a race; deciding again", vm_id=vm_id, moved=exc.subject, attempt=attempt
                )
                pause = min(cfg.retry_max_s, cfg.retry_base_s * 2**attempt)
                await asyncio.sleep(random.uniform(0, pause))
                await self.catch_up()
                fresh = True
        raise Contended(f"vm {vm_id}: lost {cfg.max_attempts} placement races in a row")


# -- process entry point ----------------------------------------------------------------------


def _signer(name: str, key_file: str | None) -> Signer:
    if key_file:
        raw = Path(key_file).read_bytes().strip()
        seed = bytes.fromhex(raw.decode()) if len(raw) == 64 else raw
        return Signer.from_private_bytes(name, seed)
    _log.warning("no --key-file: signing with a fresh key for this run only")
    return Signer.from_private_bytes(name, os.urandom(32))


def _parser() -> argparse.ArgumentParser:
    d = HostDefaults()
    p = argparse.ArgumentParser(
        prog="python -m pydstack.actors.scheduler",
        description="Place requested VMs on hosts (pydstack scheduler).",
    )
    p.add_argument("--nats", default=os.environ.get("PYDSTACK_NATS", "nats://127.0.0.1:4222"))
    p.add_argument("--name", default="scheduler", help="actor and durable consumer name")
    p.add_argument("--key-file", help="Ed25519 seed (32 bytes raw or 64 hex chars)")
    p.add_argument("--nkey-seed-file", help="NATS nkey seed of this actor's identity")
    p.add_argument("--create-stream", action="store_true", help="create the stream if missing")
    p.add_argument(
        "--keyring",
        metavar="FILE",
        type=Path,
        help="keyring.json whose admin key roots the log's keyring",
    )
    p.add_argument("--default-vcpu", type=int, default=d.vcpu)
    p.add_argument("--default-memory-mb", type=int, default=d.memory_mb)
    p.add_argument("--default-cid-start", type=int, default=d.cid_start)
    p.add_argument("--default-cid-count", type=int, default=d.cid_count)
    p.add_argument("--reconcile-interval", type=float, default=10.0, metavar="SECONDS")
    p.add_argument(
        "--checkpoint",
        type=Path,
        metavar="FILE",
        help="SQLite checkpoint of the view (resume from it instead of folding the whole log)",
    )
    p.add_argument("--metrics-port", type=int, default=0, help="serve /metrics here (0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--log-level", default="info")
    return p


async def _run(args: argparse.Namespace, signer: Signer, nkey: str | None) -> int:
    defaults = HostDefaults(
        vcpu=args.default_vcpu,
        memory_mb=args.default_memory_mb,
        cid_start=args.default_cid_start,
        cid_count=args.default_cid_count,
    )
    try:
        anchor = load_anchor(Path(args.keyring)) if args.keyring else None
        store = await EventStore.connect(
            args.nats, signer, nkey_seed=nkey, name=args.name, anchor=anchor
        )
    except StoreError as exc:
        _log.error("cannot start", error=str(exc))
        return 2
    stop_metrics = None
    if args.metrics_port:
        stop_metrics = metrics.serve_metrics(args.metrics_port, args.metrics_host)
    async with store:
        if args.create_stream:
            await store.ensure_stream()
        config = SchedulerConfig(name=args.name, defaults=defaults, checkpoint=args.checkpoint)
        scheduler = Scheduler(store, config)
        runtime = RuntimeConfig(reconcile_interval_s=args.reconcile_interval)
        try:
            async with ActorRunner(store, scheduler, runtime) as runner:
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, runner.stop)
                await runner.wait()
        except StoreError as exc:
            _log.error("scheduler stopped", error=str(exc))
            return 1
        finally:
            if stop_metrics is not None:
                stop_metrics()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from pydstack.logs import configure

    args = _parser().parse_args(argv)
    configure(level=args.log_level)
    signer = _signer(args.name, args.key_file)
    nkey = Path(args.nkey_seed_file).read_text().strip() if args.nkey_seed_file else None
    return asyncio.run(_run(args, signer, nkey))


if __name__ == "__main__":
    sys.exit(main())
