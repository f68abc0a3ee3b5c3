"""One app's story picked out of the whole log, one line per event. Pure.

Feed every event in stream order; the story keeps those about the app: its own aggregate, its
VMs (found by their ``VmRequested``) and their host reservations, the KMS requests naming it
and their decisions, and its gateway leases, registrations and their ends. Usage::

    story = AppStory(app_id)
    for seq, subject, time_ns, actor, event in records:
        line = story.take(seq, subject, time_ns, actor, event)
        if line: print(line.seq, line.text)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import msgspec

from pydstack.core.events import (
    AppComposeRevoked,
    AppRegistered,
    AppRemoved,
    AppUpgraded,
    BootInfo,
    CvmRecycled,
    CvmRegistered,
    CvmRegistrationRefused,
    CvmRemoved,
    GatewayNodeJoined,
    HostVmPlaced,
    HostVmReleased,
    KeyDenied,
    KeyIssued,
    KeyRequested,
    TunnelIpAllocated,
    TunnelIpReleased,
    VmBootError,
    VmBootProgress,
    VmExited,
    VmRejected,
    VmRequested,
    VmRestartExhausted,
    VmRestartScheduled,
    VmScheduled,
    VmStarted,
    VmStopRequested,
    VmUpdated,
    VmUpdateRejected,
    VmUpdateRequested,
)


class StoryLine(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    time_ns: int
    actor: str
    subject: str
    type: str
    text: str


def _h(value: str) -> str:
    return f"{value[:12]}…" if len(value) > 12 else value or "-"


def boot_info_text(b: BootInfo) -> str:
    """BootInfo in one line: what the KMS saw in the verified quote and event log."""
    return (f"tcb {b.tcb_status}, app {_h(b.app_id)}, compose {_h(b.compose_hash)}, "
            f"instance {_h(b.instance_id)}, os image {_h(b.os_image_hash)}, "
            f"mr_aggregated {_h(b.mr_aggregated)}")  # fmt: skip


def _policy(policy: str) -> str:
    if not policy:
        return "no policy recorded"
    if len(policy) <= 80:
        return f"policy {policy}"
    return f"policy sha256 {hashlib.sha256(policy.encode()).hexdigest()[:16]}…"


@dataclass
class AppStory:
    """Picks and describes the events of one app (see the module doc)."""

    app_id: str
    vm_ids: set[str] = field(default_factory=set)
    requests: set[str] = field(default_factory=set)  # this app's KeyRequested ids
    instances: set[str] = field(default_factory=set)
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)  # cluster -> node -> domain
    lines: list[StoryLine] = field(default_factory=list)

    @property
    def subjects(self) -> set[str]:
        return {line.subject for line in self.lines}

    def take(
        self, seq: int, subject: str, time_ns: int, actor: str, event: object
    ) -> StoryLine | None:
        """The story line for this event, or None when it is not about the app."""
        text = self._describe(subject, event)
        if text is None:
            return None
        line = StoryLine(seq=seq, time_ns=time_ns, actor=actor, subject=subject,
                         type=type(event).__name__, text=text)  # fmt: skip
        self.lines.append(line)
        return line

    def _describe(self, subject: str, e: object) -> str | None:
        kind = subject.split(".")[1] if subject.count(".") >= 2 else ""
        if kind == "app":
            return self._app(subject, e)
        if kind == "vm":
            return self._vm(subject, e)
        if kind == "host":
            if isinstance(e, HostVmPlaced) and e.vm_id in self.vm_ids:
                return f"host {e.host_id} reserved cid {e.cid} for vm {e.vm_id}"
            if isinstance(e, HostVmReleased) and e.vm_id in self.vm_ids:
                return f"host {e.host_id} released vm {e.vm_id} ({e.reason or 'no reason'})"
            return None
        if kind == "kms":
            return self._kms(e)
        if kind in ("gateway", "cvm"):
            return self._gateway(subject, e)
        return None

    def _app(self, subject: str, e: object) -> str | None:
        if subject != f"dstack.app.{self.app_id}":
            return None
        match e:
            case AppRegistered():
                return (f"registered app {e.name or '(unnamed)'}, compose hash {e.compose_hash}"
                        + (f", owner {e.owner}" if e.owner else ""))  # fmt: skip
            case AppUpgraded():
                return (f"upgraded: compose hash {_h(e.previous_compose_hash)} -> "
                        f"{e.compose_hash}")  # fmt: skip
            case AppRemoved():
                return f"removed ({e.reason or 'no reason given'})"
            case AppComposeRevoked():
                why = e.reason or "no reason given"
                return (f"compose {_h(e.compose_hash)} revoked: no key for it, no new "
                        f"registration ({why})")  # fmt: skip
            case _:
                return f"{type(e).__name__}"

    def _vm(self, subject: str, e: object) -> str | None:
        if isinstance(e, VmRequested) and e.app_id == self.app_id:
            self.vm_ids.add(e.vm_id)
        vm_id = subject.split(".", 2)[2]
        if vm_id not in self.vm_ids:
            return None
        match e:
            case VmRequested():
                r = e.resources
                ports = ", ".join(f"{p.host_port}->{p.vm_port}" for p in e.ports) or "none"
                env = f"{len(e.encrypted_env)} bytes sealed env" if e.encrypted_env else "no env"
                return (f"requested vm {vm_id}: {r.vcpu} vcpu, {r.memory_mb} MB, {r.disk_gb} GB,"
                        f" ports {ports}, {env}, compose {_h(e.compose_hash)}")  # fmt: skip
            case VmScheduled():
                return f"scheduled vm {vm_id} on host {e.host}, cid {e.cid}"
            case VmRejected():
                return f"rejected vm {vm_id}: {e.reason}"
            case VmStarted():
                how = " (adopted)" if e.adopted else f" (restart {e.attempt})" if e.attempt else ""
                return f"started vm {vm_id} on host {e.host}{how}"
            case VmBootProgress():
                return f"vm {vm_id} boot stage {e.stage}" + (f": {e.detail}" if e.detail else "")
            case VmBootError():
                return f"vm {vm_id} boot error at {e.stage}: {e.error}"
            case VmExited():
                return f"vm {vm_id} exited: {e.reason}"
            case VmStopRequested():
                return f"stop of vm {vm_id} requested" + (" (forced)" if e.force else "")
            case VmRestartScheduled():
                return f"vm {vm_id} restart {e.attempt} scheduled in {e.delay_ms} ms"
            case VmRestartExhausted():
                return f"vm {vm_id} restarts exhausted after {e.attempts}"
            case VmUpdateRequested():
                what = "compose" if e.compose else ""
                what += (" + env" if what else "env") if e.encrypted_env is not None else ""
                return f"update of vm {vm_id} requested ({what or 'resources'})"
            case VmUpdated():
                return f"vm {vm_id} updated (compose {_h(e.compose_hash)})"
            case VmUpdateRejected():
                return f"update of vm {vm_id} rejected: {e.reason}"
            case _:  # VmStopped, VmRemoved, Vm*Requested without detail
                return f"{type(e).__name__} vm {vm_id}"

    def _kms(self, e: object) -> str | None:
        match e:
            case KeyRequested() if e.app_id == self.app_id:
                self.requests.add(e.request_id)
                return (
                    f"attested: {e.method or 'key'} request {e.request_id} by instance "
                    f"{_h(e.instance_id)}, quote {_h(e.quote_hash)}, {_policy(e.policy)}"
                )
            case KeyIssued() if e.request_id in self.requests:
                image = f"; image check: {e.image_check}" if e.image_check else ""
                return (f"key issued for {e.request_id} by backend {e.backend or '?'}"
                        f"{' (' + e.verdict + ')' if e.verdict else ''}: "
                        f"{boot_info_text(e.boot_info)}{image}")  # fmt: skip
            case KeyDenied() if e.request_id in self.requests or (
                e.boot_info is not None and e.boot_info.app_id == self.app_id
            ):
                boot = f"; {boot_info_text(e.boot_info)}" if e.boot_info else ""
                return f"key DENIED for {e.request_id}: {e.reason}{boot}"
            case _:
                return None

    def _gateway(self, subject: str, e: object) -> str | None:
        match e:
            case GatewayNodeJoined():
                self.nodes.setdefault(e.cluster or "default", {})[e.node_id] = e.base_domain
                return None
            case TunnelIpAllocated() if e.app_id == self.app_id:
                self.instances.add(e.instance_id)
                return (f"gateway cluster {e.cluster} leased {e.tunnel_ip} to instance "
                        f"{_h(e.instance_id)}")  # fmt: skip
            case TunnelIpReleased() if e.instance_id in self.instances:
                return f"gateway cluster {e.cluster} released {e.tunnel_ip} ({e.reason})"
            case CvmRegistered() if e.app_id == self.app_id:
                self.instances.add(e.instance_id)
                cluster = e.cluster or "default"
                nodes = self.nodes.get(cluster, {})
                where = ", ".join(f"{n} ({d})" for n, d in sorted(nodes.items())) or "no nodes"
                return (f"registered at gateway cluster {cluster} [{where}]: instance "
                        f"{_h(e.instance_id)}, tunnel ip {e.tunnel_ip}, compose "
                        f"{_h(e.compose_hash)}")  # fmt: skip
            case CvmRegistrationRefused() if e.app_id == self.app_id:
                return f"gateway REFUSED instance {_h(e.instance_id)} ({e.code}): {e.reason}"
            case CvmRecycled() | CvmRemoved() if (
                e.instance_id in self.instances and subject == f"dstack.cvm.{e.instance_id}"
            ):
                verb = "recycled" if isinstance(e, CvmRecycled) else "removed from the gateways"
                return f"instance {_h(e.instance_id)} {verb} ({e.reason or 'no reason'})"
            case _:
                return None
