"""Fold a gateway cluster from the store: the whole stream (nodes) or the ledger alone.

``ClusterView`` is what a gateway node holds: every event of its cluster folded in stream
order, the versions of the subjects it may commit against, and the table they give::

    view = ClusterView(store, "default")
    await view.catch_up()                  # everything stored so far
    view.table().digest()                  # equal on every node at the same sequence
    async with view.following(0.05): ...   # keep folding in the background

It also folds the cluster's domain and ACME aggregates (``certs``, see
``core.gateway.certs``): domains added with ``pydstack gateway add-domain`` are base domains of
the table, and their certificates are what the node's proxy serves.

``LedgerView`` folds only ``dstack.gateway.<cluster>``: all a registration decision needs
(see ``core.gateway.cluster.decide_register``), read with one batched direct get.

Both fold only what the write policy allows (``pydstack.actors.trust``): a ``CvmRegistered`` or
a ``TunnelIpAllocated`` not signed by a gateway key of the keyring never reaches a table.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Final

import structlog

from pydstack.adapters.nats import NEW, EventStore, Recorded, Version
from pydstack.core.events import message_hash
from pydstack.core.gateway import certs as cert_fold
from pydstack.core.gateway.certs import CertState, is_cert_subject
from pydstack.core.gateway.cluster import ClusterState, cluster_subject, fold, on_its_subject
from pydstack.core.gateway.table import ClusterTable, routing_table
from pydstack.core.projections import Applied

from ..trust import Judge

_log = structlog.get_logger("pydstack.gateway.view")
_CVM_PREFIX: Final = "dstack.cvm."
_KEYRING_PREFIX: Final = "dstack.keyring."


def to_applied(cluster: str, rec: Recorded, judge: Judge, *, certs: bool = False) -> Applied | None:
    """The record as a fold input, or None when the write policy refuses it, its type is
    unknown, or it is not on its own subject (``certs``: the domain/account aggregates' rule,
    else the cluster's)."""
    ok = judge.admit(rec.seq, rec.subject, rec.data)
    if ok is None or ok.event is None:
        return None
    its = cert_fold.on_its_subject if certs else on_its_subject
    if not its(cluster, rec.subject, ok.event):
        return None
    return Applied(rec.seq, rec.time_ns or ok.envelope.time_ns, ok.event, ok.envelope.id)


class ClusterView:
    """Every event of one cluster, folded; tracks the version of each subject it folded."""

    def __init__(self, store: EventStore, cluster: str, *, check_signatures: bool = True):
        self.store = store
        self.cluster = cluster
        self.subject = cluster_subject(cluster)
        self.check_signatures = check_signatures
        self.judge = Judge(f"gateway-{cluster}", store.anchor, verify=check_signatures)
        self.state = ClusterState(cluster=cluster)
        self.certs = CertState(cluster=cluster)
        self.cursor = 0
        self.versions: dict[str, Version] = {}
        self._lock = asyncio.Lock()

    def version(self, subj: str) -> Version:
        return self.versions.get(subj, NEW)

    def domains(self) -> list[str]:
        """The base domains added to the cluster and not removed."""
        return [d.domain for d in self.certs.domains.values() if d.active]

    def table(self) -> ClusterTable:
        return routing_table(self.state, self.domains())

    async def catch_up(self) -> int:
        """Fold everything stored since the cursor; returns how many messages were read."""
        async with self._lock:
            last = await self.store.last_seq()
            if last <= self.cursor:
                return 0
            batch: list[Applied] = []
            cert_batch: list[Applied] = []
            n, seen = 0, self.cursor
            async for rec in self.store.read(from_seq=self.cursor + 1, until_seq=last):
                n, seen = n + 1, rec.seq
                if rec.subject == self.subject or rec.subject.startswith(_CVM_PREFIX):
                    self.versions[rec.subject] = Version(rec.seq, message_hash(rec.data))
                    a = to_applied(self.cluster, rec, self.judge)
                    if a is not None:
                        batch.append(a)
                elif is_cert_subject(self.cluster, rec.subject):
                    self.versions[rec.subject] = Version(rec.seq, message_hash(rec.data))
                    a = to_applied(self.cluster, rec, self.judge, certs=True)
                    if a is not None:
                        cert_batch.append(a)
                elif rec.subject.startswith(_KEYRING_PREFIX):
                    self.judge.admit(rec.seq, rec.subject, rec.data)
            self.state = fold(batch, self.state)
            if cert_batch:
                self.certs = cert_fold.fold(cert_batch, self.certs)
            # only as far as what was read: a lagging replica may end the read short of `last`
            self.cursor = max(self.cursor, seen)
            self.state.seq = self.cursor
            return n

    @contextlib.asynccontextmanager
    async def following(self, interval_s: float = 0.1) -> AsyncIterator[ClusterView]:
        """Keep catching up in the background while the block runs (level-triggered: a
        failed pass is retried at the next tick)."""

        async def loop() -> None:
            while True:
                try:
                    await self.catch_up()
                except Exception as exc:  # a transient store error must not end the node
                    _log.warning("catch-up failed; retrying", error=str(exc))
                await asyncio.sleep(interval_s)

        task = asyncio.create_task(loop(), name=f"view-{self.cluster}")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class LedgerView:
    """The cluster subject alone, folded incrementally (nodes and the IP ledger)."""

    def __init__(self, store: EventStore, cluster: str, *, check_signatures: bool = True):
        self.store = store
        self.cluster = cluster
        self.subject = cluster_subject(cluster)
        self.check_signatures = check_signatures
        self.judge = Judge(f"gateway-{cluster}", store.anchor, verify=check_signatures)
        self.state = ClusterState(cluster=cluster)
        self.version: Version = NEW

    async def catch_up(self) -> None:
        recs, version = await self.store.read_aggregate(self.subject, after=self.version.seq)
        if not recs:
            return
        await self.judge.load_keyring(self.store, recs[-1].seq)
        batch = [a for r in recs if (a := to_applied(self.cluster, r, self.judge))]
        self.state = fold(batch, self.state)
        self.state.seq = version.seq
        self.version = version

    def landed(self, applied: Applied, version: Version) -> None:
        """Fold an event this writer just committed (its version is the new head)."""
        self.state = fold([applied], self.state)
        self.version = version
