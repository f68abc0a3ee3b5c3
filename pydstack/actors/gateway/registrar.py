"""Admit registrations: decide on the cluster ledger, commit ledger + record atomically.

Every admission is ONE atomic commit guarded on two subjects::

    dstack.gateway.<cluster>   TunnelIpAllocated   expected = the ledger version it folded
    dstack.cvm.<instance_id>   CvmRegistered       expected = the CVM's version

so however many registrars run (one per gateway node, or many tasks), an address is never
handed out twice: a writer that lost the race gets a ``ConflictError``, folds the ledger
again and decides again. Usage::

    registrar = Registrar(store, RegistrarConfig(cluster="default", node_id="gw1"))
    out = await registrar.register(request)       # Admission | Refused
    await registrar.join(GatewayNodeJoined(...))  # a node, at an address nobody holds
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from pydstack.adapters.nats import NEW, Change, ConflictError, EventStore, StoreError, Version
from pydstack.adapters.nats.store import new_event_id
from pydstack.core.events import (
    CvmRegistered,
    CvmRegistrationRefused,
    GatewayNodeDown,
    GatewayNodeJoined,
    GatewayNodeUp,
    message_hash,
    subject,
)
from pydstack.core.gateway.cluster import (
    AddressPlan,
    Admission,
    ClusterState,
    Refused,
    RegisterRequest,
    decide_join,
    decide_register,
    fold,
)
from pydstack.core.projections import Applied

from .view import LedgerView

_log = structlog.get_logger("pydstack.gateway.registrar")
NodeEvent = GatewayNodeJoined | GatewayNodeUp | GatewayNodeDown


class Contended(StoreError):
    """Every attempt lost an optimistic race; the caller may retry later."""


@dataclass(frozen=True, slots=True)
class RegistrarConfig:
    cluster: str = "default"
    node_id: str | None = None  # the node this registrar serves (refuses while it is down)
    plan: AddressPlan = field(default_factory=AddressPlan)
    max_attempts: int = 200
    max_batch: int = 32  # registrations per atomic commit (2 messages each)
    retry_base_s: float = 0.002  # jittered backoff after a conflict: U(0, base * 2**attempt)
    retry_max_s: float = 0.05
    check_signatures: bool = True


class Registrar:
    """Decides and commits registrations and node membership for one cluster."""

    def __init__(self, store: EventStore, config: RegistrarConfig | None = None) -> None:
        self.store = store
        self.config = config or RegistrarConfig()
        self.ledger = LedgerView(
            store, self.config.cluster, check_signatures=self.config.check_signatures
        )
        self._queue: list[tuple[RegisterRequest, asyncio.Future[Admission | Refused]]] = []
        self._worker: asyncio.Task[None] | None = None

    @property
    def state(self) -> ClusterState:
        return self.ledger.state

    async def _cvm_version(self, subj: str) -> Version:
        last = await self.store.last_by_subject(subj)
        return NEW if last is None else Version(last.seq, message_hash(last.data))

    async def _backoff(self, attempt: int) -> None:
        cfg = self.config
        await asyncio.sleep(random.uniform(0, min(cfg.retry_max_s, cfg.retry_base_s * 2**attempt)))

    async def register(self, req: RegisterRequest) -> Admission | Refused:
        """Admit ``req`` or refuse it; a refusal is always decided on the newest ledger.

        Concurrent calls are coalesced: one worker decides everything queued meanwhile and
        commits it as one atomic batch (group commit), so a burst of registrations costs a
        few round trips, not one optimistic race per CVM.
        """
        fut: asyncio.Future[Admission | Refused] = asyncio.get_running_loop().create_future()
        self._queue.append((req, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name="gateway-registrar")
        return await fut

    async def _drain(self) -> None:
        while self._queue:
            batch = self._queue[: self.config.max_batch]
            del self._queue[: len(batch)]
            try:
                results = await self.register_many([req for req, _ in batch])
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), out in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(out)

    async def aclose(self) -> None:
        """Stop the group-commit worker (queued callers get CancelledError)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for _, fut in self._queue:
            fut.cancel()
        self._queue.clear()

    def _decide_all(self, reqs: Sequence[RegisterRequest]) -> list[Admission | Refused]:
        """Decide in order, each on the ledger as the earlier admissions leave it."""
        state, out = self.state, []
        for k, req in enumerate(reqs, 1):
            d = decide_register(state, req, self.config.plan, node_id=self.config.node_id)
            if isinstance(d, Admission):
                state = fold([Applied(self.state.seq + k, 0, d.ledger)], state)
            out.append(d)
        return out

    async def register_many(self, reqs: Sequence[RegisterRequest]) -> list[Admission | Refused]:
        """Decide all of ``reqs`` and commit the admissions in one atomic batch (retrying
        the whole decision after a lost race). Results are in request order."""
        cfg = self.config
        for attempt in range(cfg.max_attempts):
            await self.ledger.catch_up()
            outs = self._decide_all(reqs)
            admitted = [a for a in outs if isinstance(a, Admission)]
            if not admitted:
                return outs
            records: dict[str, list[CvmRegistered]] = {}
            for a in admitted:
                records.setdefault(subject("cvm", a.record.instance_id), []).append(a.record)
            cvm_versions = await asyncio.gather(*(self._cvm_version(c) for c in records))
            changes = [
                Change(self.ledger.subject, [a.ledger for a in admitted], self.ledger.version)
            ]
            changes += [
                Change(c, evs, v) for (c, evs), v in zip(records.items(), cvm_versions, strict=True)
            ]
            correlation = new_event_id()
            try:
                await self.store.commit(changes, correlation=correlation)
            except ConflictError as exc:
                _log.debug("lost a race; deciding again", moved=exc.subject, attempt=attempt)
                await self._backoff(attempt)
                continue
            for a in admitted:
                _log.info(
                    "cvm registered",
                    instance_id=a.record.instance_id,
                    app_id=a.record.app_id,
                    tunnel_ip=a.tunnel_ip,
                    renewed=a.renewed,
                    correlation=correlation,
                )
            return outs
        raise Contended(f"{len(reqs)} registrations: lost {cfg.max_attempts} races in a row")

    async def refused(
        self, req: RegisterRequest, refusal: Refused, *, correlation: str = ""
    ) -> bool:
        """Record a refusal of an attested caller on its CVM subject (best effort)."""
        if not req.instance_id:
            return False
        cvm = subject("cvm", req.instance_id)
        event = CvmRegistrationRefused(
            instance_id=req.instance_id,
            app_id=req.app_id,
            code=refusal.code,
            reason=refusal.reason,
            wg_public_key=req.wg_public_key[:64],
            compose_hash=req.compose_hash,
            attestation_hash=req.attestation_hash,
            cluster=self.config.cluster,
        )
        for attempt in range(5):
            try:
                await self.store.append(
                    cvm, [event], await self._cvm_version(cvm), correlation=correlation
                )
                return True
            except ConflictError:
                await self._backoff(attempt)
            except StoreError as exc:
                _log.warning(
                    "could not record a refusal", instance_id=req.instance_id, error=str(exc)
                )
                return False
        return False

    async def join(self, node: GatewayNodeJoined) -> GatewayNodeJoined | Refused:
        """Add (or update) a node, at an address no instance or other node holds."""
        out = await self._ledger_event(lambda: decide_join(self.state, node))
        assert not isinstance(out, GatewayNodeUp | GatewayNodeDown)
        return out

    async def set_node_up(self, node_id: str, up: bool, reason: str = "") -> None:
        """Mark a node up or down (a down node takes no registrations, CVMs skip it)."""
        cluster = self.config.cluster
        event: NodeEvent = (
            GatewayNodeUp(node_id=node_id, cluster=cluster)
            if up
            else GatewayNodeDown(node_id=node_id, reason=reason, cluster=cluster)
        )
        await self._ledger_event(lambda: event)

    async def _ledger_event(self, decide: Callable[[], NodeEvent | Refused]) -> NodeEvent | Refused:
        for attempt in range(self.config.max_attempts):
            await self.ledger.catch_up()
            out = decide()
            if isinstance(out, Refused):
                return out
            event_id = new_event_id()
            try:
                head = await self.store.append(
                    self.ledger.subject, [out], self.ledger.version, event_ids=[event_id]
                )
            except ConflictError:
                await self._backoff(attempt)
                continue
            self.ledger.landed(Applied(head.seq, time.time_ns(), out, event_id), head)
            return out
        raise Contended(f"cluster {self.config.cluster}: lost {self.config.max_attempts} races")
