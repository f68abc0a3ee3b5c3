"""Events of the VM aggregate, subject ``dstack.vm.<vm_id>``."""

from __future__ import annotations

import msgspec

from ._base import Event


class PortMap(msgspec.Struct, frozen=True, kw_only=True):
    """A host port forwarded to a guest port, like dstack's ``PortMapping``."""

    protocol: str = "tcp"
    host_address: str = "127.0.0.1"
    host_port: int
    vm_port: int


class VmResources(msgspec.Struct, frozen=True, kw_only=True):
    vcpu: int
    memory_mb: int
    disk_gb: int = 0
    gpus: tuple[str, ...] = ()


class VmRequested(Event, tag="VmRequested", frozen=True):
    """A command: run one CVM of an app with these resources."""

    vm_id: str
    app_id: str
    name: str
    resources: VmResources
    image: str = ""
    compose_hash: str = ""
    ports: tuple[PortMap, ...] = ()
    encrypted_env: bytes = b""  # sealed to the app's env key; never plaintext
    host: str = ""  # pin to a host when set
    compose: bytes = b""  # raw app-compose.json; empty: the app's compose with compose_hash
    user_config: str = ""  # dstack's user_config, handed to the guest as is
    # dstack's per-VM sys-config override (empty: the host's); where the CVM looks for its
    # KMS / gateway, never whom it trusts (it checks the KMS's RA-TLS evidence itself)
    kms_urls: tuple[str, ...] = ()
    gateway_urls: tuple[str, ...] = ()


class VmScheduled(Event, tag="VmScheduled", frozen=True):
    """The scheduler placed the VM; mirrors ``HostVmPlaced`` on the host aggregate."""

    vm_id: str
    host: str
    cid: int
    ports: tuple[PortMap, ...] = ()
    placement_event: str = ""  # id of the HostVmPlaced event that reserved the room


class VmRejected(Event, tag="VmRejected", frozen=True):
    vm_id: str
    reason: str


class VmStartRequested(Event, tag="VmStartRequested", frozen=True):
    vm_id: str


class VmStopRequested(Event, tag="VmStopRequested", frozen=True):
    vm_id: str
    force: bool = False


class VmRemoveRequested(Event, tag="VmRemoveRequested", frozen=True):
    vm_id: str


class VmStarted(Event, tag="VmStarted", frozen=True):
    vm_id: str
    host: str
    pid: int = 0
    attempt: int = 0  # the automatic restart attempt that started it (0: not a restart)
    adopted: bool = False  # found already running (the VMM restarted), not started again
    # added (issue 15.8): where its quotes come from, "tdx" or "simulated" (tcg, kvm, sandbox:
    # the dev PKI signs them, attestation proves nothing); "" before the field
    tee: str = ""


class VmBootProgress(Event, tag="VmBootProgress", frozen=True):
    vm_id: str
    stage: str
    detail: str = ""


class VmBootError(Event, tag="VmBootError", frozen=True):
    vm_id: str
    stage: str
    error: str


class VmExited(Event, tag="VmExited", frozen=True):
    vm_id: str
    reason: str
    exit_code: int | None = None


class VmStopped(Event, tag="VmStopped", frozen=True):
    vm_id: str


class VmRemoved(Event, tag="VmRemoved", frozen=True):
    vm_id: str


class VmRestartScheduled(Event, tag="VmRestartScheduled", frozen=True):
    """The VMM will restart an exited VM at ``due_ns`` (auto-restart ``attempt``, 1-based)."""

    vm_id: str
    attempt: int
    delay_ms: int
    due_ns: int


class VmRestartExhausted(Event, tag="VmRestartExhausted", frozen=True):
    """Auto-restart gave up after ``attempts`` restarts; an operator start resets it."""

    vm_id: str
    attempts: int


class VmUpdateRequested(Event, tag="VmUpdateRequested", frozen=True):
    """A command: change a VM's compose, env, ports or resources (next start applies them).

    ``None`` / ``0`` / empty: keep. The app id stays; the disk only grows.
    """

    vm_id: str
    compose: bytes = b""
    encrypted_env: bytes | None = None
    user_config: str | None = None
    ports: tuple[PortMap, ...] | None = None
    vcpu: int = 0
    memory_mb: int = 0
    disk_gb: int = 0
    image: str = ""
    kms_urls: tuple[str, ...] | None = None  # dstack's update_kms_urls; () = the host's
    gateway_urls: tuple[str, ...] | None = None


class VmUpdated(Event, tag="VmUpdated", frozen=True):
    """The VMM accepted an update (the host reservation follows it); ``request`` is its id."""

    vm_id: str
    request: str = ""
    compose_hash: str = ""
    resources: VmResources | None = None
    ports: tuple[PortMap, ...] | None = None
    image: str = ""


class VmUpdateRejected(Event, tag="VmUpdateRejected", frozen=True):
    vm_id: str
    reason: str
    request: str = ""
