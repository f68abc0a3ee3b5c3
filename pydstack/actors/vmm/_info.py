"""dstack's ``VmInfo`` of one VM, from the VMM's fold (``Status``, ``GetInfo``, ``pydstack vm``).

dstack's keys (``uptime`` and ``exited_at`` as humantime durations, ``configuration`` with every
``VmConfiguration`` field, the last guest ``events``) plus pydstack's own (``desired``,
``host``, ``cid``, restarts, ``compose_hash``)."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from pydstack.core.vmm import VmRecord


def _since(ns: int) -> str:
    """How long ago, as dstack shows it (humantime, whole seconds): ``1day 2h 3m 4s``."""
    s = max(0, (time.time_ns() - ns) // 1_000_000_000)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    days = f"{d}day" + ("s" if d > 1 else "")
    parts = [p for v, p in ((d, days), (h, f"{h}h"), (m, f"{m}m"), (s % 60, f"{s % 60}s")) if v]
    return " ".join(parts) or "0s"


def _uptime(rec: VmRecord) -> str:
    if rec.vm.state not in ("starting", "running") or not rec.restart.started_ns:
        return ""
    return _since(rec.restart.started_ns)


def vm_info(rec: VmRecord, *, brief: bool = False) -> dict[str, Any]:
    vm = rec.vm
    info: dict[str, Any] = {
        "id": vm.vm_id, "name": vm.name, "status": vm.state, "desired": vm.desired,
        "uptime": _uptime(rec),
        "events": [msgspec.to_builtins(e) for e in rec.events],
        "app_id": vm.app_id, "host": vm.host, "cid": vm.cid, "boot_progress": vm.boot_stage,
        "boot_error": vm.last_error, "exit_reason": vm.reason, "exit_code": vm.exit_code,
        "starts": vm.starts, "restarts": vm.restarts, "restart_attempts": rec.restart.attempts,
        "restart_exhausted": rec.restart.exhausted, "image_version": rec.image,
        "compose_hash": rec.compose_hash, "uptime_since_ns": rec.restart.started_ns,
        # where its quotes came from at its last start (simulated: attestation proves nothing)
        "tee": rec.tee or "unknown",
    }  # fmt: skip
    if vm.state in ("exited", "stopped"):  # dstack: how long ago the process ended
        info["exited_at"] = _since(rec.restart.exited_ns if vm.state == "exited" else vm.updated_ns)
    if not brief:
        info["configuration"] = {
            "name": vm.name, "image": rec.image, "vcpu": rec.resources.vcpu,
            "memory": rec.resources.memory_mb, "disk_size": rec.resources.disk_gb,
            "ports": [msgspec.to_builtins(p) for p in rec.ports],
            "compose_file": rec.compose.decode(errors="replace"),
            "encrypted_env": rec.encrypted_env.hex(), "app_id": vm.app_id,
            "user_config": rec.user_config, "hugepages": False, "pin_numa": False,
            "gpus": {"attach_mode": "listed", "gpus": []},
            "kms_urls": list(rec.kms_urls), "gateway_urls": list(rec.gateway_urls),
            "stopped": vm.desired == "stopped", "no_tee": False,
        }  # fmt: skip
    return info
