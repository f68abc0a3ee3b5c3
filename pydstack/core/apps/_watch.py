"""Following one deploy on the log, from its VmRequested until the app is reachable. Pure.

Stages, in order: ``requested`` → ``scheduled`` → ``started`` → ``boot:<stage>`` (each guest
boot stage the VMM reports) → ``keys`` (the KMS issued this app's keys) → ``registered`` (a
``CvmRegistered`` for the app at a gateway) → ``ready`` (booted to a ready stage and, when a
gateway is up and the compose wants one, registered). A rejection, boot error, exit, key denial
or gateway refusal ends the watch with ``failed`` set. Usage::

    w = Watch(app_id=..., vm_id=..., compose_hash=..., gateway_expected=True)
    for subj, a in events_after_the_request:
        w, steps = step(w, subj, a)
        for s in steps: print(s.stage, s.text)
        if w.failed or w.stage == "ready": break
"""

from __future__ import annotations

import msgspec
from msgspec.structs import replace

from pydstack.core.events import (
    CvmRegistered,
    CvmRegistrationRefused,
    KeyDenied,
    KeyIssued,
    KeyRequested,
    VmBootError,
    VmBootProgress,
    VmExited,
    VmRejected,
    VmRemoved,
    VmRestartExhausted,
    VmScheduled,
    VmStarted,
)
from pydstack.core.projections import READY_STAGES, Applied, Vm, vms


class Step(msgspec.Struct, frozen=True):
    """A stage reached (or the failure), with one line of detail, at stream ``seq``."""

    stage: str
    text: str
    seq: int = 0


class Watch(msgspec.Struct, frozen=True, kw_only=True):
    app_id: str
    vm_id: str
    compose_hash: str = ""
    gateway_expected: bool = False  # a gateway node is up and the compose enables it
    vm: Vm | None = None
    stage: str = "requested"
    booted: bool = False  # reached one of READY_STAGES
    requests: frozenset[str] = frozenset()  # this app's KeyRequested ids
    registered: tuple[tuple[str, str], ...] = ()  # (cluster, instance_id)
    failed: str = ""  # one line: what went wrong, naming the stage


def _fail(w: Watch, a: Applied, why: str) -> tuple[Watch, list[Step]]:
    text = f"{why} (at stage {w.stage}, seq {a.seq})"
    return replace(w, failed=text), [Step("failed", text, a.seq)]


def _ready(w: Watch, seq: int, steps: list[Step]) -> Watch:
    if w.stage != "ready" and w.booted and (w.registered or not w.gateway_expected):
        steps.append(Step("ready", "the app is up", seq))
        return replace(w, stage="ready")
    return w


def step(w: Watch, subj: str, a: Applied) -> tuple[Watch, list[Step]]:
    """Fold one event of the log into the watch; the stages it reached (or the failure)."""
    if w.failed or w.stage == "ready":
        return w, []
    e = a.event
    if subj == f"dstack.vm.{w.vm_id}":
        w = replace(w, vm=vms.apply(w.vm, a))
        return _vm_step(w, a)
    steps: list[Step] = []
    match e:
        case KeyRequested() if e.app_id == w.app_id:
            w = replace(w, requests=w.requests | {e.request_id})
        case KeyIssued() if e.request_id in w.requests:
            b = e.boot_info
            steps.append(Step("keys", f"KMS issued the app keys (backend {e.backend or '?'}, "
                                      f"tcb {b.tcb_status}, compose {b.compose_hash[:12]}…)",
                              a.seq))  # fmt: skip
            w = replace(w, stage="keys")
        case KeyDenied() if e.request_id in w.requests:
            return _fail(w, a, f"the KMS denied the app keys: {e.reason}")
        case CvmRegistered() if e.app_id == w.app_id and (
            not w.compose_hash or e.compose_hash == w.compose_hash
        ):
            cluster = e.cluster or "default"
            steps.append(Step("registered", f"registered at gateway cluster {cluster} "
                                            f"(instance {e.instance_id[:12]}…, tunnel ip "
                                            f"{e.tunnel_ip})", a.seq))  # fmt: skip
            seen = (*w.registered, (cluster, e.instance_id))
            w = replace(w, stage="registered", registered=seen)
        case CvmRegistrationRefused() if e.app_id == w.app_id:
            return _fail(w, a, f"the gateway refused the registration ({e.code}): {e.reason}")
        case _:
            return w, []
    return _ready(w, a.seq, steps), steps


def _vm_step(w: Watch, a: Applied) -> tuple[Watch, list[Step]]:
    e, steps = a.event, []
    match e:
        case VmScheduled():
            ports = ", ".join(f"{p.host_address}:{p.host_port}->{p.vm_port}" for p in e.ports)
            steps.append(Step("scheduled", f"placed on host {e.host} (cid {e.cid}"
                                           f"{', ports ' + ports if ports else ''})",
                              a.seq))  # fmt: skip
            w = replace(w, stage="scheduled")
        case VmRejected():
            return _fail(w, a, f"the scheduler rejected the VM: {e.reason}")
        case VmStarted():
            how = "adopted" if e.adopted else f"pid {e.pid}" if e.pid else "started"
            steps.append(Step("started", f"CVM started on host {e.host} ({how})", a.seq))
            w = replace(w, stage="started")
        case VmBootProgress():
            stage = f"boot:{e.stage}"
            steps.append(Step(stage, e.detail or e.stage, a.seq))
            w = replace(w, stage=stage, booted=w.booted or e.stage in READY_STAGES)
        case VmBootError():
            return _fail(w, a, f"boot error ({e.stage}): {e.error}")
        case VmExited():
            code = "" if e.exit_code is None else f", exit code {e.exit_code}"
            return _fail(w, a, f"the CVM exited before it was ready: {e.reason}{code}")
        case VmRestartExhausted():
            return _fail(w, a, f"the VMM gave up restarting it after {e.attempts} attempts")
        case VmRemoved():
            return _fail(w, a, "the VM was removed")
        case _:
            return w, []
    return _ready(w, a.seq, steps), steps


_WAITING = {
    "requested": "the scheduler to place the VM on a host",
    "scheduled": "the host's VMM to start the CVM (is `pydstack up --vmm sandbox` running there?)",
    "started": "the guest to report its boot stages",
    "keys": "the guest to finish booting",
    "registered": "the guest to finish booting",
}


def waiting_for(w: Watch) -> str:
    """What the deploy waits for at its current stage (for a timeout message)."""
    if w.stage in _WAITING:
        return _WAITING[w.stage]
    if w.booted and w.gateway_expected and not w.registered:
        return "the CVM to register at a gateway (CvmRegistered)"
    return "the guest to reach a ready boot stage"
