"""Events of the host aggregate, subject ``dstack.host.<host_id>``.

Placement lives here: reserving room on a host is an append on the host's subject with the
sequence the scheduler folded, so two schedulers can never over-commit a host or double-book a
CID (optimistic concurrency on the host aggregate).
"""

from __future__ import annotations

from ._base import Event
from .vms import PortMap, VmResources


class HostJoined(Event, tag="HostJoined", frozen=True):
    host_id: str
    vcpu: int = 20  # dstack's per-host defaults
    memory_mb: int = 100 * 1024
    cid_start: int = 1000
    cid_count: int = 1000
    port_range: tuple[int, int] = (20000, 29999)
    address: str = ""
    # The host's operator lets CVM ports be forwarded from non-loopback addresses
    # (`up --allow-public-ports`); without it a request for one is refused.
    public_ports: bool = False
    # Where this host's CVMs run (`up --platform`): "tdx", "kvm", "tcg" (QEMU) or "sandbox"
    # (simulated, no VM); "" unknown (joined without a VMM, or before this field existed).
    platform: str = ""
    platform_reason: str = ""  # one line: why (e.g. "auto: no TDX (...); no KVM (...)")


class HostHeartbeat(Event, tag="HostHeartbeat", frozen=True):
    host_id: str
    running_vms: int = 0


class HostLeft(Event, tag="HostLeft", frozen=True):
    host_id: str
    reason: str = ""


class HostVmPlaced(Event, tag="HostVmPlaced", frozen=True):
    """Room on this host is reserved for a VM: its resources, its CID and its host ports."""

    host_id: str
    vm_id: str
    cid: int
    resources: VmResources
    ports: tuple[PortMap, ...] = ()


class HostVmReleased(Event, tag="HostVmReleased", frozen=True):
    """The reservation is given back (VM removed, or placed elsewhere by a racing scheduler)."""

    host_id: str
    vm_id: str
    reason: str = ""
