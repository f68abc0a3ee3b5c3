"""Operator requests to a host's VMM, checked before anything is appended.

Each ``decide_*`` returns the command event to append or raises :class:`Refused` naming the
bad field, so the HTTP API and the CLI refuse the same things with the same words and a
refused request leaves the log untouched::

    event = decide_create(host, images, vm_id=..., name="web", vcpu=2, memory_mb=2048, ...)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from typing import Final

from pydstack.core.events import (
    PortMap,
    VmRemoveRequested,
    VmRequested,
    VmResources,
    VmStartRequested,
    VmStopRequested,
    VmUpdateRequested,
)
from pydstack.core.portmap import port_map_error
from pydstack.core.projections import Host, Vm

from .image_name import image_name_error

NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ANY: Final = frozenset({"", "0.0.0.0", "::", "[::]"})
# A disk is a sparse file the guest can fill: a size past this is a typo, not a plan.
MAX_DISK_GB: Final = 16384


class Refused(ValueError):
    """A request that must not be appended; ``field`` names what is wrong, ``status`` the HTTP
    status that says so (400 bad input, 404 unknown VM, 409 conflicts with the host's state)."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


def _overlap(a: PortMap, b: PortMap) -> bool:
    if a.protocol != b.protocol or a.host_port != b.host_port:
        return False
    return a.host_address == b.host_address or bool({a.host_address, b.host_address} & _ANY)


def check_ports(host: Host, ports: tuple[PortMap, ...], vm_id: str = "") -> None:
    """Each port valid (an IP literal; loopback unless the host allows public ports), inside
    the host's range, not mapped twice, not reserved by another VM."""
    lo, hi = host.port_range
    for i, p in enumerate(ports):
        name = f"{p.protocol}/{p.host_port}"
        bad = port_map_error(p, public_allowed=host.public_ports)
        if bad:
            raise Refused("ports", bad)
        if not lo <= p.host_port <= hi:
            raise Refused("ports", f"host port {name} is outside this host's range {lo}..{hi}")
        if any(_overlap(p, q) for q in ports[:i]):
            raise Refused("ports", f"host port {name} is mapped twice")
        for other, q in host.ports_in_use:
            if other != vm_id and _overlap(p, q):
                raise Refused("ports", f"host port {name} is taken by vm {other}", 409)


def check_resources(host: Host, vcpu: int, memory_mb: int, vm_id: str = "") -> None:
    """Fits in what the host has free (plus what ``vm_id`` already holds)."""
    if vcpu <= 0 or memory_mb <= 0:
        raise Refused("vcpu" if vcpu <= 0 else "memory", "vcpu and memory must be > 0")
    held = host.placements.get(vm_id)
    vcpu_free = host.vcpu_free + (held.vcpu if held else 0)
    mem_free = host.memory_free_mb + (held.memory_mb if held else 0)
    if vcpu > vcpu_free:
        raise Refused("vcpu", f"{vcpu} vCPU asked, host {host.host_id} has {vcpu_free} free", 409)
    if memory_mb > mem_free:
        raise Refused(
            "memory", f"{memory_mb} MB asked, host {host.host_id} has {mem_free} MB free", 409
        )


def check_disk(disk_gb: int) -> None:
    """0 (the image's default) up to ``MAX_DISK_GB``."""
    if disk_gb < 0:
        raise Refused("disk_size", "disk size must be >= 0")
    if disk_gb > MAX_DISK_GB:
        raise Refused("disk_size", f"disk size {disk_gb} GB is over this VMM's limit of "
                      f"{MAX_DISK_GB} GB")  # fmt: skip


def check_image_name(image: str, field: str = "image") -> None:
    """The name is one safe path component (``image_name_error``), else ``Refused``."""
    if (reason := image_name_error(image, field)) is not None:
        raise Refused(field, reason)


def check_image(images: Collection[str], image: str) -> None:
    check_image_name(image)
    if image not in images:
        have = ", ".join(sorted(images)) or "none"
        raise Refused("image", f"image {image!r} is not on this host (have: {have})")


def decide_create(
    host: Host,
    images: Collection[str],
    *,
    vm_id: str,
    name: str,
    app_id: str,
    vcpu: int,
    memory_mb: int,
    disk_gb: int,
    image: str,
    compose: bytes,
    ports: tuple[PortMap, ...] = (),
    encrypted_env: bytes = b"",
    user_config: str = "",
    existing: Mapping[str, Vm] | None = None,
) -> VmRequested:
    """A ``VmRequested`` pinned to ``host`` (dstack's CreateVm), or ``Refused``."""
    if not NAME.match(name):
        raise Refused("name", f"name {name!r}: letters, digits, '.', '_', '-' (1-64, no leading "
                      "punctuation)")  # fmt: skip
    if existing and vm_id in existing:
        raise Refused("id", f"vm {vm_id} exists already", 409)
    check_disk(disk_gb)
    check_image(images, image)
    check_resources(host, vcpu, memory_mb)
    check_ports(host, ports)
    return VmRequested(
        vm_id=vm_id, app_id=app_id, name=name, image=image, ports=ports, host=host.host_id,
        resources=VmResources(vcpu=vcpu, memory_mb=memory_mb, disk_gb=disk_gb),
        compose_hash=hashlib.sha256(compose).hexdigest() if compose else "",
        compose=compose, encrypted_env=encrypted_env, user_config=user_config,
    )  # fmt: skip


def _known(vm: Vm | None, vm_id: str) -> Vm:
    if vm is None:
        raise Refused("id", f"no vm {vm_id}", 404)
    if vm.state == "removed" or vm.desired == "removed":
        raise Refused("id", f"vm {vm_id} is removed", 404)
    return vm


def decide_command(
    vm: Vm | None, vm_id: str, action: str, *, force: bool = False
) -> VmStartRequested | VmStopRequested | VmRemoveRequested:
    """start / stop (``force``: kill) / remove."""
    vm = _known(vm, vm_id)
    if action == "start":
        return VmStartRequested(vm_id=vm_id)
    if action == "stop":
        return VmStopRequested(vm_id=vm_id, force=force)
    if action == "remove":
        return VmRemoveRequested(vm_id=vm_id)
    raise Refused("action", f"unknown action {action!r}: start, stop or remove")


def decide_update(
    vm: Vm | None,
    host: Host | None,
    images: Collection[str] | None,
    request: VmUpdateRequested,
    *,
    current_disk_gb: int,
) -> VmUpdateRequested:
    """Checks an update against the VM and its host: disk only grows, resources fit, ports
    are free; the compose may change, the app id stays (the KMS decides at boot whether the
    new compose hash is still allowed)."""
    vm = _known(vm, request.vm_id)
    r = request
    if r.disk_gb and r.disk_gb < current_disk_gb:
        raise Refused("disk_size", f"disk can only grow ({current_disk_gb} GB now, "
                      f"{r.disk_gb} GB asked)")  # fmt: skip
    check_disk(r.disk_gb)
    if r.image:
        check_image_name(r.image)
        if images is not None:
            check_image(images, r.image)
    if host is not None:
        if r.vcpu or r.memory_mb:
            check_resources(
                host, r.vcpu or vm.resources.vcpu, r.memory_mb or vm.resources.memory_mb, vm.vm_id
            )
        if r.ports is not None:
            check_ports(host, r.ports, vm.vm_id)
    return request
