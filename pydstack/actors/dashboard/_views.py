"""The JSON the pages show, built from a ``LiveState``. Pure functions, one per endpoint."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from pydstack.core.gateway.table import routing_table
from pydstack.core.projections import App, Host, Vm

from ._state import EventRow, KeyDecision, LiveState, jsonable


def _builtins(obj: msgspec.Struct) -> dict[str, Any]:
    out: dict[str, Any] = jsonable(msgspec.to_builtins(obj, builtin_types=(bytes,)))
    return out


def host_json(h: Host) -> dict[str, Any]:
    out = _builtins(h)
    out["placements"] = [
        {"vm_id": vm, "cid": p.cid, "vcpu": p.vcpu, "memory_mb": p.memory_mb,
         "ports": [msgspec.to_builtins(x) for x in p.ports]}
        for vm, p in sorted(h.placements.items())
    ]  # fmt: skip
    out.update(vcpu_free=h.vcpu_free, memory_free_mb=h.memory_free_mb, vms=len(h.placements))
    return out


def app_json(a: App, state: LiveState, *, with_compose: bool = False) -> dict[str, Any]:
    out = _builtins(a)
    del out["compose"]
    if with_compose:
        out["compose"] = a.compose.decode("utf-8", "replace")
    out["vms"] = sorted(
        v.vm_id for v in state.proj.vms.values() if v.app_id == a.app_id and v.state != "removed"
    )
    return out


def vm_json(v: Vm) -> dict[str, Any]:
    out = _builtins(v)
    env = v.encrypted_env
    # The sealed env is opaque here; its size and digest identify it without shipping it.
    out["encrypted_env"] = {"bytes": len(env), "sha256": hashlib.sha256(env).hexdigest()[:16]}
    return out


def hosts(state: LiveState) -> list[dict[str, Any]]:
    return [host_json(state.proj.hosts[k]) for k in sorted(state.proj.hosts)]


def apps(state: LiveState) -> list[dict[str, Any]]:
    items = sorted(state.proj.apps.values(), key=lambda a: -a.seq)
    return [app_json(a, state) for a in items]


def vms(state: LiveState) -> list[dict[str, Any]]:
    items = sorted(state.proj.vms.values(), key=lambda v: -v.requested_ns)
    return [vm_json(v) for v in items]


def decision_json(d: KeyDecision) -> dict[str, Any]:
    return {
        "request_id": d.request_id, "cluster": d.cluster, "method": d.method, "app_id": d.app_id,
        "instance_id": d.instance_id, "quote_hash": d.quote_hash, "outcome": d.outcome,
        "reason": d.reason, "backend": d.backend,
        "boot_info": None if d.boot_info is None else _builtins(d.boot_info),
        "requested_seq": d.requested_seq, "requested_ns": d.requested_ns,
        "decided_seq": d.decided_seq, "decided_ns": d.decided_ns,
    }  # fmt: skip


def keys(state: LiveState) -> dict[str, Any]:
    clusters = []
    for name in sorted(state.kms):
        k = state.kms[name]
        root = k.root
        clusters.append({
            "cluster": name, "issued": k.issued, "denied": k.denied,
            "open_requests": sorted(k.open_requests), "replicas": list(k.replicas),
            "root": None if root is None else {
                "k256_public_key": root.k256_public_key.hex(),
                "ca_public_key": root.ca_public_key.hex(), "instance_id": root.instance_id,
            },
        })  # fmt: skip
    decisions = [decision_json(d) for d in reversed(state.decisions.values())]
    return {"clusters": clusters, "decisions": decisions}


def gateways(state: LiveState) -> list[dict[str, Any]]:
    out = []
    for name in sorted(state.clusters):
        cs = state.clusters[name]
        table = routing_table(cs, state.domains(name))  # the nodes' table, digest included
        t = _builtins(table)
        t["digest"] = table.digest()
        t["instances"] = [
            {"instance_id": r.instance_id, "app_id": r.app_id, "tunnel_ip": r.tunnel_ip,
             "status": r.status, "last_seen": r.last_seen(), "handshakes": dict(r.handshakes),
             "registered_s": r.registered_s}
            for r in (cs.instances[k] for k in sorted(cs.instances))
        ]  # fmt: skip
        out.append(t)
    return out


class EventFilter(msgspec.Struct, frozen=True, kw_only=True):
    """``subject``: a NATS wildcard (``dstack.vm.*``, ``dstack.>``) or a prefix;
    ``types``: exact event types (any of them); both empty match everything."""

    subject: str = ""
    types: tuple[str, ...] = ()

    def matches(self, row: EventRow) -> bool:
        if self.types and row.type not in self.types:
            return False
        return not self.subject or subject_matches(self.subject, row.subject)


def subject_matches(pattern: str, subject: str) -> bool:
    if "*" not in pattern and ">" not in pattern:
        return subject.startswith(pattern)
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or tok not in ("*", s[i]):
            return False
    return len(s) == len(p)


def events(state: LiveState, since: int, limit: int, flt: EventFilter) -> list[dict[str, Any]]:
    """Events after ``since`` from the window, oldest first, at most ``limit`` (the newest
    ``limit`` when ``since`` is 0)."""
    rows = [r for r in state.events if r.seq > since and flt.matches(r)]
    rows = rows[-limit:] if since == 0 else rows[:limit]
    return [r.to_json() for r in rows]
