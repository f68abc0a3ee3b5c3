"""``python -m pydstack.actors.vmm``: one host's VMM as its own process, and the builder that
``pydstack up`` shares with it (``running_vmm``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from pydstack.actors.runtime import ActorRunner, RuntimeConfig
from pydstack.adapters.cvm import CvmBackend
from pydstack.adapters.firewall import HostServices
from pydstack.adapters.nats import EventStore, StoreError
from pydstack.adapters.supervisor import SupervisorClient, SupervisorError, launch_supervisor
from pydstack.core.vmm import RestartPolicy

if TYPE_CHECKING:
    from pydstack.adapters.sim import SimConfig

from ._access import ApiEndpoints, ApiSetupError, serve_api
from ._actor import Vmm, VmmConfig
from ._egress import guarded_guests

_log = structlog.get_logger("pydstack.vmm")
# dstack's vmm.toml default: QEMU passes the guest's configfs-tsm quote requests to the host's
# QGS on this vsock port (tdx-guest quote-generation-socket)
DSTACK_QGS_PORT = 4050


@dataclass(frozen=True)
class VmmLaunch:
    """Everything a host's VMM needs besides its event store."""

    config: VmmConfig
    backend: str = "sandbox"  # or "qemu"
    supervisor_socket: Path | None = None  # default: <state_dir>/supervisor.sock
    images: Path | None = None  # default: <state_dir>/images (sandbox) / images_dir() (qemu)
    api_socket: bool = True  # the API on <state_dir>/api/vmm.sock (0600, our uid or root)
    api_host: str = "127.0.0.1"
    api_port: int = -1  # TCP with the token in <state_dir>/api/token: -1 none; 0 any free port
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    dev_pki: Path | None = None  # no TDX: the simulator PKI the KMS trusts (`up`'s dev-pki)
    # qemu: what guests may reach on this host (the rest of it is closed to them)
    guest_services: HostServices = field(default_factory=HostServices)
    # qemu: auto | tdx | kvm | tcg (`up --platform`), resolved by adapters.qemu.probe
    platform: str = "auto"
    # the registry mirrors of every CVM's docker engine (`up --registry`): the sandbox's engines
    # take them all, the first is sys-config's docker_registry (QEMU guests configure theirs)
    registry_mirrors: tuple[str, ...] = ()
    # bench.scale and tests only, never a CLI or `up` option: the "sim" load generator backend
    # (adapters.sim) instead of ``backend``; its platform reason says it is no CVM.
    sim: SimConfig | None = None


SANDBOX_PLATFORM = ("sandbox", "simulated: a network namespace with its own dockerd, no VM")


def resolve_platform(backend: str, wanted: str) -> tuple[str, str]:
    """``(platform, reason)`` of this host's CVMs; refused (StoreError, one line) when the
    platform asked for is missing here. Probes once per process (``adapters.qemu.probe``)."""
    if backend != "qemu":
        if wanted not in ("auto", "sandbox"):
            raise StoreError(f"--platform {wanted}: only with the qemu backend "
                             f"(this host's VMM backend is {backend or 'none'})")  # fmt: skip
        return SANDBOX_PLATFORM
    from pydstack.adapters.qemu.platform import WANTED, PlatformRefused
    from pydstack.adapters.qemu.probe import resolve_platform as probe

    if wanted not in WANTED:
        raise StoreError(f"--platform {wanted}: one of {', '.join(WANTED)}")
    try:
        choice = probe(wanted)  # narrowed to Wanted by the check above
    except PlatformRefused as exc:
        raise StoreError(str(exc)) from None
    return choice.platform, choice.reason


async def build_backend(launch: VmmLaunch, sv: SupervisorClient) -> CvmBackend:
    sd = launch.config.state_dir
    if launch.sim is not None:
        from pydstack.adapters.sim import SimBackend

        return SimBackend(launch.sim, sv)
    if launch.backend == "sandbox":
        from pydstack.adapters.sandbox import SandboxBackend, SandboxConfig, build_busybox_image

        images = launch.images or sd / "images"
        if not (images / "sandbox-busybox" / "metadata.json").exists():
            await asyncio.to_thread(build_busybox_image, images)
        # Stable across VMM restarts (hash() of a str is salted per process): the backend
        # finds the socket dirs of CVMs it created before.
        digest = hashlib.sha1(str(sd.absolute()).encode()).hexdigest()[:8]
        run_root = Path("/run/pydstack-sandbox") / digest
        return SandboxBackend(
            SandboxConfig(
                vms_dir=sd / "vms",
                images=images,
                run_root=run_root,
                dev_pki=launch.dev_pki,
                registry_mirrors=launch.registry_mirrors,
            ),
            sv,
        )
    if launch.backend == "qemu":
        from pydstack.adapters.qemu import Platform, QemuBackend, QemuBackendConfig

        vsock = await asyncio.to_thread(os.path.exists, "/dev/vhost-vsock")
        app_images = None
        if launch.dev_pki is not None:  # no TDX: the guest simulates its TD (backend docs)
            from pydstack.adapters.sandbox import build_busybox_image

            app_images = sd / "app-images"
            if not (app_images / "sandbox-busybox" / "metadata.json").exists():
                await asyncio.to_thread(build_busybox_image, app_images)
        chosen = launch.config.platform or "tcg"  # "": built without running_vmm
        platforms: dict[str, Platform] = {"tdx": "tdx", "kvm": "kvm", "tcg": "tcg"}
        if (platform := platforms.get(chosen)) is None:
            raise StoreError(f"qemu backend: platform {chosen!r} is not tdx, kvm or tcg")
        cfg = QemuBackendConfig(
            vms_dir=sd / "vms", images=launch.images, vsock=vsock, dev_pki=launch.dev_pki,
            app_images=app_images, platform=platform,
            qgs_port=DSTACK_QGS_PORT if platform == "tdx" else None,
        )  # fmt: skip
        return QemuBackend(cfg, sv)
    raise StoreError(f"unknown backend {launch.backend!r}: sandbox or qemu")


async def ensure_supervisor(socket: Path, state_dir: Path) -> SupervisorClient:
    """Connect to the host's supervisor, starting one (in its own session) if none answers."""
    client = SupervisorClient(socket)
    if not await client.ping():
        launch_supervisor(socket, state_dir / "supervisor")
        await client.wait_ready()
    return client


async def keep_supervisor(sv: SupervisorClient, state_dir: Path, every_s: float = 1.0) -> None:
    """Relaunch the host's supervisor when it stops answering (killed, crashed): the VMM's
    passes need it, and the CVMs it ran are then restarted by the restart policy."""
    while True:
        await asyncio.sleep(every_s)
        if await sv.ping():
            continue
        _log.warning("supervisor not answering; relaunching it", socket=str(sv.socket_path))
        try:
            launch_supervisor(sv.socket_path, state_dir / "supervisor")
            await sv.wait_ready()
        except (OSError, SupervisorError) as exc:
            _log.error("supervisor relaunch failed; retrying", error=str(exc))
        else:
            _log.info("supervisor relaunched", socket=str(sv.socket_path))


async def _release_supervisor(sv: SupervisorClient) -> None:
    """On the VMM's exit: an idle supervisor exits too; one with CVMs keeps them running for
    the next VMM to adopt (so a restart of `up` does not restart the CVMs)."""
    try:
        idle = await sv.shutdown_if_idle()
    except SupervisorError as exc:
        _log.warning("supervisor left running", reason=str(exc))
        return
    if idle:
        _log.info("supervisor stopped: no CVM running", socket=str(sv.socket_path))
    else:
        _log.info("CVMs keep running under the supervisor; the next VMM adopts them",
                  socket=str(sv.socket_path))  # fmt: skip


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@contextlib.asynccontextmanager
async def running_vmm(
    store: EventStore, launch: VmmLaunch
) -> AsyncIterator[tuple[Vmm, ApiEndpoints]]:
    """The VMM actor (joined, consuming, polling) and where its API listens."""
    sd = launch.config.state_dir
    sd.mkdir(parents=True, exist_ok=True)
    sock = launch.supervisor_socket or sd / "supervisor.sock"
    async with contextlib.AsyncExitStack() as stack:
        sv = await ensure_supervisor(sock, sd)
        stack.push_async_callback(sv.close)
        stack.push_async_callback(_release_supervisor, sv)  # after the watchdog stopped
        watchdog = asyncio.create_task(keep_supervisor(sv, sd), name="vmm-supervisor-watchdog")
        stack.push_async_callback(_cancel, watchdog)
        if launch.backend == "qemu":  # before any QEMU starts: its user and its firewall
            await stack.enter_async_context(guarded_guests(launch.guest_services))
        wanted = launch.platform
        if launch.sim is not None:
            from pydstack.adapters.sim import PLATFORM as SIM_PLATFORM

            platform, reason = SIM_PLATFORM
        else:
            platform, reason = await asyncio.to_thread(resolve_platform, launch.backend, wanted)
        mirror = next(iter(launch.registry_mirrors), "")  # dstack's sys-config names one
        launch = replace(launch, config=replace(launch.config, platform=platform,
                                                platform_reason=reason,
                                                docker_registry=launch.config.docker_registry
                                                or mirror))  # fmt: skip
        backend = await build_backend(launch, sv)
        if (close_backend := getattr(backend, "aclose", None)) is not None:
            stack.push_async_callback(close_backend)  # the sim backend's host-side boots
        vmm = Vmm(store, backend, launch.config)
        await stack.enter_async_context(vmm)
        actor = await stack.enter_async_context(ActorRunner(store, vmm, launch.runtime))
        consuming = asyncio.create_task(actor.wait(), name=f"actor-{vmm.name}")
        stack.push_async_callback(_cancel, consuming)
        vmm.lifelines = (consuming, watchdog)  # what vmm.failed() watches besides its poll
        ends = ApiEndpoints()
        if launch.api_socket or launch.api_port >= 0:
            api = sd / "api"
            try:
                runners, ends = await serve_api(
                    vmm, socket=api / "vmm.sock" if launch.api_socket else None,
                    tcp=(launch.api_host, launch.api_port) if launch.api_port >= 0 else None,
                    token_file=api / "token",
                )  # fmt: skip
            except (ApiSetupError, OSError) as exc:
                raise StoreError(f"VMM API: {exc}") from None
            for runner in runners:
                stack.push_async_callback(runner.cleanup)
        _log.info("vmm ready", host_id=launch.config.host_id, backend=backend.kind,
                  platform=platform, platform_reason=reason, api=ends.url,
                  api_tcp=ends.tcp_url)  # fmt: skip
        yield vmm, ends


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pydstack.actors.vmm", description=__doc__)
    p.add_argument("--nats", default=os.environ.get("PYDSTACK_NATS", "nats://127.0.0.1:4222"))
    p.add_argument("--host-id", required=True)
    p.add_argument("--backend", choices=("sandbox", "qemu"), default="sandbox")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--supervisor-socket", type=Path)
    p.add_argument("--images", type=Path)
    p.add_argument(
        "--platform",
        choices=("auto", "tdx", "kvm", "tcg"),
        default="auto",
        help="qemu backend: TDX when the host has it, KVM when a probe guest boots, else TCG",
    )
    p.add_argument(
        "--nkey-seed-file",
        help="NATS nkey seed (SU…) of this host's vmm identity "
        "(identities/vmm-<host>.nk of `up --join BUNDLE`); signs too; required",
    )
    p.add_argument(
        "--keyring",
        metavar="FILE",
        type=Path,
        help="keyring.json whose admin key roots the log's keyring",
    )
    p.add_argument("--stream", default="DSTACK")
    p.add_argument(
        "--api-port",
        type=int,
        default=-1,
        help="also serve the API on TCP (token: <state-dir>/api/token); 0: any port",
    )
    p.add_argument(
        "--allow-public-ports",
        action="store_true",
        help="CVM ports may be forwarded from non-loopback host addresses",
    )
    p.add_argument("--api-url-file", type=Path, help="write the API URL here once serving")
    p.add_argument("--vcpu", type=int, default=20)
    p.add_argument("--memory-mb", type=int, default=100 * 1024)
    p.add_argument("--cid-start", type=int, default=1000)
    p.add_argument("--port-range", default="20000-29999")
    p.add_argument("--poll-interval", type=float, default=0.5)
    p.add_argument("--reconcile-interval", type=float, default=10.0)
    p.add_argument("--heartbeat-interval", type=float, default=30.0)
    p.add_argument("--restart-interval", type=float, default=20.0)
    p.add_argument("--restart-backoff", type=float, default=5.0)
    p.add_argument("--restart-max-backoff", type=float, default=300.0)
    p.add_argument("--restart-retries", type=int, default=5)
    p.add_argument("--restart-reset-window", type=float, default=300.0)
    p.add_argument("--no-auto-restart", action="store_true")
    p.add_argument("--log-level", default="info")
    return p


async def _run(a: argparse.Namespace) -> int:
    from pydstack.adapters.nats import StoreError, StreamSettings
    from pydstack.adapters.nats.identity import standalone_identity

    name = f"vmm-{a.host_id}"
    try:
        signer, seed, anchor = standalone_identity(
            a.nkey_seed_file, name, "vmm", a.keyring, "--nkey-seed-file"
        )
    except StoreError as exc:
        _log.error("cannot start", error=str(exc))
        return 2
    lo, _, hi = a.port_range.partition("-")
    policy = RestartPolicy(
        enabled=not a.no_auto_restart, interval_s=a.restart_interval,
        initial_backoff_s=a.restart_backoff, max_backoff_s=a.restart_max_backoff,
        max_retries=a.restart_retries, reset_window_s=a.restart_reset_window,
    )  # fmt: skip
    config = VmmConfig(
        host_id=a.host_id, state_dir=a.state_dir.absolute(), vcpu=a.vcpu,
        memory_mb=a.memory_mb, cid_start=a.cid_start, port_range=(int(lo), int(hi)),
        restart=policy, poll_interval_s=a.poll_interval,
        heartbeat_interval_s=a.heartbeat_interval, allow_public_ports=a.allow_public_ports,
    )  # fmt: skip
    runtime = RuntimeConfig(reconcile_interval_s=a.reconcile_interval)
    launch = VmmLaunch(config=config, backend=a.backend, supervisor_socket=a.supervisor_socket,
                       images=a.images, api_port=a.api_port, runtime=runtime,
                       platform=a.platform)  # fmt: skip
    store = await EventStore.connect(a.nats, signer, nkey_seed=seed, name=name, anchor=anchor,
                                     settings=StreamSettings(name=a.stream))  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with store, running_vmm(store, launch) as (_, api):
        if a.api_url_file:
            a.api_url_file.write_text(api.url)
        await stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    from pydstack.logs import configure

    a = _parser().parse_args(argv)
    configure(level=a.log_level)
    try:
        return asyncio.run(_run(a))
    except StoreError as exc:
        print(f"vmm: {exc}", file=sys.stderr)
        return 2
