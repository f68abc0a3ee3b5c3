"""The port a VMM actor drives CVMs through, whatever runs them (QEMU, a sandbox).

A backend keeps each CVM's work dir and process across VMM restarts: ``list`` is the
adopt-list a restarted VMM rebuilds its view (and its CID pool) from, covering stopped CVMs
too, since a stopped CVM still owns its CID (dstack #996). Every call is idempotent on the
state it leaves: ``create`` twice prepares once (a disk only grows), ``stop`` on a stopped
CVM is a no-op, ``remove`` of an unknown CVM raises ``CvmNotFound``.

Guest progress arrives as ``GuestEvent`` lines the guest writes to the host (virtio-serial
file here, vsock on TDX hosts); ``events(vm_id, offset)`` reads them incrementally.
"""

from __future__ import annotations

from typing import Literal, Protocol

import msgspec

from pydstack.core.events import PortMap

CvmState = Literal["created", "running", "stopped", "exited", "error"]

# dstack-types ``shared_filenames`` (v0.5.11): the host-shared files by the names a dstack
# guest reads, beside app-compose.json; pydstack's earlier names, which the guest still reads.
APP_COMPOSE = "app-compose.json"
SYS_CONFIG = ".sys-config.json"
INSTANCE_INFO = ".instance_info"
ENCRYPTED_ENV = ".encrypted-env"
USER_CONFIG = ".user-config"
SHARED_NAMES = (APP_COMPOSE, SYS_CONFIG, INSTANCE_INFO, ENCRYPTED_ENV, USER_CONFIG)
LEGACY_SHARED_NAMES = ("sys-config.json", "instance-info.json", "encrypted-env", "user-config")


class CvmError(Exception):
    """A CVM operation failed or was refused; one line, what is wrong and what to do."""


class CvmNotFound(CvmError):
    def __init__(self, vm_id: str) -> None:
        super().__init__(f"no CVM {vm_id!r} on this host; create it first")
        self.vm_id = vm_id


class CvmSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a CVM is made of; the VMM builds it from the VM's events."""

    vm_id: str
    image: str  # image name (a directory in the backend's images dir)
    vcpu: int
    memory_mb: int
    disk_gb: int = 0  # 0: the image's own disk size
    name: str = ""
    cid: int | None = None  # vsock CID granted by placement
    ports: tuple[PortMap, ...] = ()
    app_compose: bytes = b""  # raw app-compose.json; sha256 = compose hash (TDX mrconfigid)
    shared_files: dict[str, bytes] = {}  # more files for the guest's host share (SHARED_NAMES)


class CvmStatus(msgspec.Struct, frozen=True, kw_only=True):
    vm_id: str
    state: CvmState
    cid: int | None = None
    pid: int | None = None
    exit_code: int | None = None  # None when unknown (adopted, or never ran)
    reason: str = ""  # why it is not running, in words
    started_at_ns: int | None = None
    stopped_at_ns: int | None = None
    adopted: bool = False  # the process outlived a restart of its manager
    boot_stage: str = ""  # last stage the guest reported since the last start
    ports: tuple[PortMap, ...] = ()


class GuestEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One line of guest progress: ``booted``, ``ready``, ``docker``, or the agent's stages."""

    stage: str
    detail: str = ""
    uptime_s: float = 0.0


class CvmBackend(Protocol):
    """Lifecycle of CVMs on one host. Implementations: ``adapters.qemu.QemuBackend`` and
    ``adapters.sandbox.SandboxBackend`` (both on ``adapters.cvm_supervised.SupervisedCvms``)."""

    kind: str

    async def create(self, spec: CvmSpec) -> CvmStatus:
        """Prepare (or update) the work dir, host-shared files and disk; does not start."""
        ...

    async def start(self, vm_id: str) -> CvmStatus: ...

    async def stop(self, vm_id: str, timeout_s: float = 30.0) -> CvmStatus:
        """Graceful: ask the guest to power off, force after ``timeout_s``."""
        ...

    async def kill(self, vm_id: str) -> CvmStatus: ...

    async def remove(self, vm_id: str) -> None:
        """Kill if running, then delete the work dir and forget the process."""
        ...

    async def status(self, vm_id: str) -> CvmStatus: ...

    async def events(self, vm_id: str, offset: int = 0) -> tuple[list[GuestEvent], int]:
        """Guest events written since byte ``offset``, and the offset to pass next time."""
        ...

    async def list(self) -> list[CvmStatus]:
        """Every CVM of this host, running or not (the adopt-list after a restart)."""
        ...
