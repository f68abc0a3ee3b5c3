"""Time-driven decisions on a folded cluster: recycle stale instances, report liveness. Pure.

Recycling is decided by any node and committed like a registration, guarded on the cluster
subject and on the CVM's subject, so when every node notices the same stale instance at once
exactly one ``CvmRecycled`` is written (the others' commits conflict, they fold again and
find nothing left to do). dstack's defaults: check every 5 min, recycle after 10 h without a
handshake on any node. Usage::

    for r in decide_recycle(state, now_s=int(time.time()), timeout_s=36000):
        ...  # commit r.ledger on dstack.gateway.<cluster>, r.record on dstack.cvm.<id>
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from pydstack.core.events import CvmLiveness, CvmRecycled, TunnelIpReleased

from .cluster import ClusterState


class Recycle(msgspec.Struct, frozen=True, kw_only=True):
    """End one instance: ``ledger`` on the cluster subject, ``record`` (if any) on the CVM's."""

    instance_id: str
    ledger: TunnelIpReleased
    record: CvmRecycled | None


def decide_recycle(state: ClusterState, *, now_s: int, timeout_s: int) -> list[Recycle]:
    """Instances whose registration and last handshake on every node are older than the
    timeout, plus leases whose record already ended without releasing its address."""
    out: list[Recycle] = []
    for iid in sorted(state.leases):
        lease = state.leases[iid]
        release = TunnelIpReleased(
            cluster=state.cluster, instance_id=iid, tunnel_ip=lease.tunnel_ip, reason="recycled"
        )
        inst = state.routed(iid)
        if inst is None:
            record = state.instances.get(iid)
            if record is not None and record.status != "active":
                out.append(Recycle(instance_id=iid, ledger=release, record=None))
            continue
        if now_s - inst.last_seen() > timeout_s:
            age = now_s - inst.last_seen()
            why = f"no handshake on any node for {age}s (timeout {timeout_s}s)"
            out.append(
                Recycle(
                    instance_id=iid, ledger=release, record=CvmRecycled(instance_id=iid, reason=why)
                )
            )
    return out


def decide_liveness(
    state: ClusterState, node_id: str, observed: Mapping[str, int], *, min_interval_s: int
) -> list[CvmLiveness]:
    """Coarse liveness for one node: given the device's last handshake per WireGuard key
    (unix s), report instances whose handshake advanced by ``min_interval_s`` or more."""
    out: list[CvmLiveness] = []
    for inst in state.routed_instances():
        seen = observed.get(inst.wg_public_key, 0)
        if seen > 0 and seen - inst.handshakes.get(node_id, 0) >= min_interval_s:
            out.append(
                CvmLiveness(instance_id=inst.instance_id, node_id=node_id, last_handshake=seen)
            )
    return out
