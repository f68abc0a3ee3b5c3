"""What bench.chaos reads from the log after the soak: acknowledged writes that went missing,
effects that happened twice, and the NATS nodes agreeing on one log.

    missing = lost_acked(acked, events)        # acked: [(subject, type)], events: `events --json`
    dups = duplicate_effects(events)           # ["vm c3: VmStarted twice without an exit", ...]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

# Events that end a VM's run: a VmStarted after one of these is a new start, not a duplicate.
_RUN_ENDS = {"VmExited", "VmStopped", "VmRemoved"}


def lost_acked(acked: Iterable[tuple[str, str]], events: list[dict[str, Any]]) -> list[str]:
    """Each (subject, type) a writer got acknowledged must be on the log at least as many
    times as it was acknowledged; the ones short of that."""
    want = Counter(acked)
    have = Counter((e["subject"], e["type"]) for e in events)
    return [f"{t} on {s}: {n} acked, {have[(s, t)]} on the log"
            for (s, t), n in sorted(want.items()) if have[(s, t)] < n]  # fmt: skip


def duplicate_effects(events: list[dict[str, Any]]) -> list[str]:
    """Effects that happened twice for one cause: a VM started again while its run had not
    ended (not an adoption by a restarted VMM), a VM scheduled twice, an instance holding two
    tunnel IPs at once, or one tunnel IP held by two instances at once."""
    out: list[str] = []
    running: dict[str, bool] = {}
    scheduled: Counter[str] = Counter()
    lease_of: dict[tuple[str, str], str] = {}  # (cluster, instance) -> ip
    holder_of: dict[tuple[str, str], str] = {}  # (cluster, ip) -> instance
    for e in events:
        t, b = e["type"], e.get("body") or {}
        if t == "VmStarted" and not b.get("adopted"):
            vm = b["vm_id"]
            if running.get(vm):
                out.append(f"vm {vm}: VmStarted at seq {e['seq']} while already running")
            running[vm] = True
        elif t in _RUN_ENDS:
            running[b["vm_id"]] = False
        elif t == "VmScheduled":
            scheduled[b["vm_id"]] += 1
            if scheduled[b["vm_id"]] == 2:
                out.append(f"vm {b['vm_id']}: scheduled twice (seq {e['seq']})")
        elif t == "TunnelIpAllocated":
            key, ip = (b["cluster"], b["instance_id"]), b["tunnel_ip"]
            if lease_of.get(key, ip) != ip:
                out.append(f"instance {b['instance_id']}: tunnel IP {ip} while holding "
                           f"{lease_of[key]} (seq {e['seq']})")  # fmt: skip
            holder = holder_of.get((b["cluster"], ip), b["instance_id"])
            if holder != b["instance_id"]:
                out.append(f"tunnel IP {ip}: given to {b['instance_id']} while {holder} "
                           f"holds it (seq {e['seq']})")  # fmt: skip
            lease_of[key] = ip
            holder_of[(b["cluster"], ip)] = b["instance_id"]
        elif t == "TunnelIpReleased":
            lease_of.pop((b["cluster"], b["instance_id"]), None)
            if holder_of.get((b["cluster"], b["tunnel_ip"])) == b["instance_id"]:
                del holder_of[(b["cluster"], b["tunnel_ip"])]
    return out


def nodes_agree(logs: list[list[tuple[int, bytes]]]) -> str:
    """ "" when every NATS node holds the same messages; else what differs."""
    lengths = [len(x) for x in logs]
    if all(x == logs[0] for x in logs[1:]):
        return ""
    return f"the NATS nodes hold different logs (messages per node: {lengths})"
