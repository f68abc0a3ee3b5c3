"""Recycle stale instances: whichever node wins the optimistic race writes the one event.

Each pass folds the cluster (``ClusterView``), asks the pure ``decide_recycle`` which leases
to end, and commits them in atomic chunks, each guarded on the cluster subject AND on every
recycled CVM's subject at the versions it folded. When all nodes notice the same stale
instance at once, one commit lands; the others conflict, fold again, and find nothing left,
so there is exactly one ``CvmRecycled`` (and one ``TunnelIpReleased``) per stale instance. A
handshake reported meanwhile (``CvmLiveness`` on the CVM's subject) also conflicts, so it is
taken into account before anything is recycled. Usage::

    recycler = Recycler(view, RecycleConfig(timeout_s=36000))
    recycled = await recycler.recycle_once(now_s=int(time.time()))
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import structlog

from pydstack.adapters.nats import Change, ConflictError
from pydstack.core.events import subject
from pydstack.core.gateway.recycle import Recycle, decide_recycle

from .registrar import Contended
from .view import ClusterView

_log = structlog.get_logger("pydstack.gateway.recycler")


@dataclass(frozen=True, slots=True)
class RecycleConfig:
    interval_s: float = 300.0  # dstack: recycle.interval = 5m
    timeout_s: int = 36_000  # dstack: recycle.timeout = 10h without a handshake on any node
    chunk: int = 50  # instances per atomic commit
    max_attempts: int = 50


class Recycler:
    def __init__(self, view: ClusterView, config: RecycleConfig | None = None) -> None:
        self.view = view
        self.config = config or RecycleConfig()

    def _changes(self, chunk: list[Recycle]) -> list[Change]:
        view = self.view
        changes = [Change(view.subject, [r.ledger for r in chunk], view.version(view.subject))]
        for r in chunk:
            if r.record is not None:
                cvm = subject("cvm", r.instance_id)
                changes.append(Change(cvm, [r.record], view.version(cvm)))
        return changes

    async def recycle_once(self, now_s: int) -> list[str]:
        """One pass; returns the instances this node recycled (others may have done some)."""
        cfg = self.config
        done: list[str] = []
        for attempt in range(cfg.max_attempts):
            await self.view.catch_up()
            todo = decide_recycle(self.view.state, now_s=now_s, timeout_s=cfg.timeout_s)
            if not todo:
                return done
            chunk = todo[: cfg.chunk]
            try:
                await self.view.store.commit(self._changes(chunk))
            except ConflictError as exc:
                _log.debug("lost a recycle race; folding again", moved=exc.subject)
                await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))
                continue
            done += [r.instance_id for r in chunk]
            _log.info("recycled", instances=[r.instance_id for r in chunk], reason="stale")
        raise Contended(f"recycle: lost {cfg.max_attempts} races in a row")
