"""The embedded control plane behind ``pydstack up``: nats-server, the stream, the actors.

Usage::

    plane = ControlPlane(DataDir.resolve(None), UpOptions(port=4222))
    await plane.run()        # until SIGINT/SIGTERM or plane.stop(); actors stop before NATS

With ``UpOptions.nats_url`` set it joins that server (or cluster) instead of starting one.
Everything lives in the data dir (``$PYDSTACK_HOME`` or ``./.pydstack``)::

    config.json        port, host, stream, optional nats_url — reused by the next `up`
    identities/        <name>.nk seeds (0600) and keyring.json (public)
    nats/              nats-server.conf, nats-server.log, jetstream/
    state.json         while running: pid, NATS URL and nats_pid, metrics URL (read by the CLI)
    up.lock            held while an `up` runs on this data dir
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import nats.errors
import structlog

from pydstack.adapters.nats import (
    EventStore,
    NatsServer,
    NatsServerConfig,
    PermissionDenied,
    StoreError,
    StreamSettings,
    free_port,
)
from pydstack.adapters.nats.identity import ROLES, Identity, IdentityStore, nats_users
from pydstack.adapters.nats.server import port_in_use
from pydstack.core.events import HostJoined, subject
from pydstack.core.policy import TENANT, Keyring
from pydstack.upkeep import (
    Crashing,
    Failed,
    KeptComponent,
    Opener,
    RestartBudget,
    Restarted,
    keep_nats_server,
    orphaned_nats_server,
    stop_orphan,
)

if TYPE_CHECKING:
    from pydstack.actors.gateway.up_launch import UpGateway
    from pydstack.actors.kms.launch import KmsLaunch
    from pydstack.adapters.acme import Rfc2136Config
    from pydstack.adapters.firewall import HostServices

DEFAULT_PORT: Final = 4222
JOIN_WAIT_S: Final = 20.0  # how long a joining host waits for the servers to admit its key
# Every role gets an identity named after it, so later actors find theirs in the data dir.
# one identity per role, named after it; tenants get theirs from `pydstack tenant add NAME`
STANDARD_IDENTITIES: Final = tuple((role, role) for role in ROLES if role != TENANT)

_log = structlog.get_logger("pydstack.up")


@dataclass
class PlaneConfig:
    """What `up` remembers in config.json between runs."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    stream: str = "DSTACK"
    nats_url: str = ""  # set: join this server instead of starting one
    deny_delete: bool = True  # applied when the stream is created


class DataDir:
    """The files of one control plane."""

    def __init__(self, path: Path) -> None:
        self.path = path.absolute()

    @classmethod
    def resolve(cls, path: str | Path | None) -> DataDir:
        return cls(Path(path or os.environ.get("PYDSTACK_HOME") or ".pydstack"))

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def nats_dir(self) -> Path:
        return self.path / "nats"

    @property
    def identities(self) -> IdentityStore:
        return IdentityStore(self.path / "identities")

    def load_config(self) -> PlaneConfig:
        if not self.config_path.exists():
            return PlaneConfig()
        try:
            raw = json.loads(self.config_path.read_text())
            return PlaneConfig(**{k: v for k, v in raw.items() if k in PlaneConfig.__annotations__})
        except (OSError, ValueError, TypeError) as exc:
            raise StoreError(f"bad config {self.config_path}: {exc}") from None

    def save_config(self, cfg: PlaneConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    def state(self) -> dict[str, Any]:
        """What a running `up` published about itself ({} when none runs)."""
        try:
            state: dict[str, Any] = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return state

    def lock(self) -> IO[str]:
        """Hold the data dir for this process, or fail naming the `up` that holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        f = (self.path / "up.lock").open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise StoreError(
                f"another `pydstack up` (pid {pid}) is running on {self.path}; stop it first "
                "or use another --data-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        return f


async def _close(store: EventStore) -> None:
    """Drain, or just close when the server is gone (drain refuses while reconnecting)."""
    try:
        await store.close()
    except (nats.errors.Error, OSError):
        await store.nc.close()


def default_host_id() -> str:
    name = re.sub(r"[^A-Za-z0-9_\-]", "-", socket.gethostname())[:64].strip("-")
    return name or "local"


@dataclass(frozen=True)
class UpOptions:
    port: int | None = None  # None: the data dir's (4222 the first time)
    host: str | None = None
    nats_url: str | None = None
    stream: str | None = None
    allow_delete: bool = False  # only for tamper tests: the stream then allows deletes
    metrics_port: int = 0  # 0: any free port; -1: off
    host_id: str | None = field(default_factory=default_host_id)  # None: join no host
    host_vcpu: int = 20
    host_memory_mb: int = 100 * 1024
    reconcile_interval_s: float = 10.0
    kms: bool | None = None  # None: run one with the embedded server, not when joining
    kms_port: int = 0  # 0: 9100 when free, else any free port
    # "": "log" (an app gets keys only for a compose its own events on the log name), on
    # every host; "webhook" (kms_auth_url), "eth" (a DstackKms contract: kms_eth_rpc_url,
    # kms_contract), or "dev" (allow-all, loudly) when asked.
    kms_auth: str = ""
    kms_auth_url: str = ""
    kms_eth_rpc_url: str = ""
    kms_contract: str = ""
    kms_onboard: str = ""  # a running KMS to get the cluster's root keys from (a new replica)
    kms_onboard_token_file: str = ""  # that KMS's onboarding token (its backend: dev)
    kms_allow_mrs: tuple[str, ...] = ()  # dev backend: KMS measurements allowed the root keys
    # Further KMS replicas this host's CVMs may ask, in order, after this up's own KMS (if any)
    kms_urls: tuple[str, ...] = ()
    kms_instance: str = ""  # this up's KMS instance id [default: the host id]
    kms_workers: int = 1  # > 1: the KMS runs as that many processes (actors/kms/workers.py)
    dashboard_port: int = 8080  # taken: any free port; 0: any free port; -1: no dashboard
    dashboard_kms: str = ""  # KMS URL for the deploy form's env keys [default: up's own KMS]
    # Where the dashboard listens; not loopback: every request needs its login token
    dashboard_listen: str = "127.0.0.1"
    dashboard_hosts: tuple[str, ...] = ()  # further Host names it answers (e.g. a proxy's)
    # Gateway node (see _start_gateway); None: run one with the KMS where wireguard-go can run
    gateway: bool | None = None
    gateway_domain: str = "gw.localhost"
    gateway_port: int = 0  # the proxy's port; 0: 8443 when free, else any free port
    gateway_node_id: str = "gw1"  # one per host in a multi-host gateway cluster
    gateway_listen: str = ""  # where CVMs and clients reach it; "": NATS's listen address
    gateway_acme_directory: str = ""  # "": dev CA certificates; else ACME (up_launch.UpGateway)
    gateway_acme_ca_bundle: str = ""  # the ACME server's HTTPS CA ("": the system's roots)
    gateway_challtestsrv: str = ""  # DNS-01 through pebble-challtestsrv at this URL
    gateway_rfc2136: Rfc2136Config | None = None  # DNS-01 by TSIG-signed RFC 2136 updates
    # nftables in the gateway's namespace (here: the host's): no forwarding between CVMs
    gateway_forward_guard: bool = True
    vmm_backend: str = ""  # "sandbox" / "qemu": run this host's VMM (needs host_id); "": none
    vmm_api_port: int = -1  # the VMM API on TCP too (with its token): -1 no, 0 any free port
    vmm_platform: str = "auto"  # qemu: auto / tdx / kvm / tcg (actors.vmm.resolve_platform)
    allow_public_ports: bool = False  # CVM ports on non-loopback host addresses
    # CVMs' registry mirrors (sandbox engines; guests may reach them): `up --registry`'s own
    # local registry (registry_url, for `image push`) first, then --registry-mirror ones
    registry_url: str = ""
    registry_mirrors: tuple[str, ...] = ()
    # A join bundle (`pydstack host add`): this host's own keys and the cluster's public data;
    # the data dir then holds no admin key and this up needs no stream-admin rights
    join_bundle: str = ""


class ControlPlane:
    """Owns nats-server (unless joining), the admin connection and the actor runners."""

    def __init__(self, data: DataDir, opts: UpOptions) -> None:
        self.data = data
        self.opts = opts
        self.server: NatsServer | None = None
        self.url = ""
        self._stop = asyncio.Event()
        self._stop_metrics: Callable[[], None] | None = None
        self.metrics_url = ""
        self.anchor: bytes | None = None  # the admin key: the root of the log's keyring
        self.admin_store: EventStore | None = None  # None on a host joined with a bundle
        self.kms_url = ""
        self.kms: dict[str, Any] = {}  # kms_* entries of state.json: cluster, root, auth, token
        self.dashboard_url = ""
        self.dashboard_token_file = ""  # its login token (Bearer, or /?token= once)
        self.vmm_url = ""  # unix:<socket> (dstack's vmm-cli --url form)
        self.vmm_api: dict[str, Any] = {}  # vmm_* entries of state.json, when a VMM runs
        self.gateway: dict[str, Any] = {}  # gateway_* entries of state.json, when one runs
        self.nats_budget = RestartBudget()  # crashes of the embedded server `up` rides out
        self.restarts: dict[str, int] = {}  # component -> restarts so far (state.json)
        self._state: dict[str, Any] = {}
        self._recording: set[asyncio.Task[None]] = set()  # restarts being appended
        self._kept: list[KeptComponent] = []  # components restarted in place (upkeep)

    def stop(self) -> None:
        self._stop.set()

    def _config(self) -> PlaneConfig:
        cfg = self.data.load_config()
        o = self.opts
        cfg.port = o.port if o.port is not None else cfg.port
        cfg.host = o.host or cfg.host
        cfg.stream = o.stream or cfg.stream
        if o.allow_delete:
            cfg.deny_delete = False
        self.data.save_config(cfg)
        if o.nats_url:  # for this run only; put nats_url in config.json to make it stick
            cfg.nats_url = o.nats_url
        return cfg

    async def run(self) -> int:
        """Start everything, wait for a stop signal, stop everything; returns an exit code."""
        lock = self.data.lock()
        try:
            return await self._run()
        finally:
            self.data.state_path.unlink(missing_ok=True)
            lock.close()

    async def _run(self) -> int:
        cfg = self._config()
        if self.opts.join_bundle:
            ids = await asyncio.to_thread(self._install_bundle, cfg)
        else:
            ids = self.data.identities.ensure_all(STANDARD_IDENTITIES)
        self.anchor = self.data.identities.anchor()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        try:
            async with contextlib.AsyncExitStack() as stack:
                if cfg.nats_url:
                    self.url = cfg.nats_url
                else:
                    self.server = NatsServer(NatsServerConfig(
                        data_dir=self.data.nats_dir, host=cfg.host, port=cfg.port,
                        users=nats_users(Keyring(), ids.values(), cfg.stream, self._host()),
                    ))  # fmt: skip
                    orphan = orphaned_nats_server(self.data.nats_dir, self.server.conf_path)
                    if orphan is not None:  # the lock is ours: its `up` is gone
                        await stop_orphan(orphan, "nats-server")
                    await self.server.start()
                    stack.push_async_callback(self._stop_server)
                    self.url = self.server.url
                settings = StreamSettings(name=cfg.stream, deny_delete=cfg.deny_delete)
                if "admin" in ids:
                    admin = await self._connect(ids["admin"], settings)
                    stack.push_async_callback(_close, admin)
                    await admin.ensure_stream()
                    await self._ensure_keyring(admin, ids)
                    self.admin_store = admin
                    if self.server is not None:
                        self._follow_keyring(stack, admin, ids, cfg)
                else:  # a host joined with a bundle: the stream must exist (no admin rights)
                    async with await self._connect(next(iter(ids.values())), settings) as probe:
                        await probe.ensure_stream()
                if self.opts.host_id:
                    await self._join_host(ids["vmm"], settings, self.opts.host_id)
                self._serve_metrics()
                stack.callback(self._close_metrics)
                await self._run_actors(ids, settings, cfg)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        _log.info("control plane stopped", data_dir=str(self.data.path))
        return 0

    def _host(self) -> str:
        return self.opts.host_id or ""

    def _follow_keyring(
        self,
        stack: contextlib.AsyncExitStack,
        admin: EventStore,
        ids: dict[str, Identity],
        cfg: PlaneConfig,
    ) -> None:
        """Keep the embedded server's users equal to the log's keyring (a key bound by
        `pydstack host add` may log in, a revoked one is logged out): config rewritten and
        reloaded (SIGHUP) on every keyring change. Servers `up` does not run (a NATS cluster
        of your own) need the same users: `pydstack host nats-config` prints them."""
        from pydstack.actors.hosts import follow_nats_users

        server = self.server
        assert server is not None

        def on_change(ring: Keyring) -> None:
            if server.reload(nats_users(ring, ids.values(), cfg.stream, self._host())):
                _log.info("nats users reloaded from the keyring", users=len(server.config.users))

        async def follow() -> None:
            while True:  # a read failing (nats-server restarting) is retried, from the start
                try:
                    await follow_nats_users(admin, on_change)
                except (StoreError, nats.errors.Error, TimeoutError) as exc:
                    if admin.nc.is_closed:  # `up` is stopping
                        return
                    _log.warning("following the keyring: read failed; retrying",
                                 error=str(exc) or type(exc).__name__)  # fmt: skip
                    await asyncio.sleep(1.0)

        task = asyncio.create_task(follow(), name="nats-users")
        task.add_done_callback(_report_follower)
        stack.callback(task.cancel)

    def _install_bundle(self, cfg: PlaneConfig) -> dict[str, Identity]:
        """Put a join bundle's keys (0600) and public keyring into the data dir; its
        identities by role. The bundle names the NATS URLs, stream and host id."""
        from pydstack.adapters.nats.bundle import install_bundle, read_bundle

        bundle = read_bundle(Path(self.opts.join_bundle))
        if self.opts.host_id and self.opts.host_id != bundle.host:
            raise StoreError(f"--host-id {self.opts.host_id} but the bundle is host "
                             f"{bundle.host}'s; drop --host-id")  # fmt: skip
        cfg.stream = bundle.stream
        return install_bundle(bundle, self.data.identities, self.data.path)

    async def _connect(self, ident: Identity, settings: StreamSettings) -> EventStore:
        # An unauthenticated server (joined with --nats) just ignores the nkey.
        return await EventStore.connect(
            self.url,
            ident.signer,
            nkey_seed=ident.seed,
            settings=settings,
            name=f"pydstack-{ident.name}",
            anchor=self.anchor,
        )

    async def _ensure_keyring(self, admin: EventStore, ids: dict[str, Identity]) -> None:
        """Bind this data dir's identities on the log's keyring (signed by admin, the anchor
        every actor here pins): the first `up` starts it; a joining host adds its host to the
        vmm key. Events already on the log stay valid as "pre-keyring"."""
        from pydstack.actors.trust import ensure_keyring
        from pydstack.core.policy import HOST_BOUND

        host = (self.opts.host_id,) if self.opts.host_id else ()
        await ensure_keyring(admin, [
            (i.key, i.name, i.role, host if i.role in HOST_BOUND else ()) for i in ids.values()
        ])  # fmt: skip

    async def _join_host(self, vmm: Identity, settings: StreamSettings, host_id: str) -> None:
        """Record this machine as a host with room for VMs (once; later runs find it). The
        servers admit the key on dstack.host.<host_id> once they reloaded their users from
        the keyring entry just bound: refused meanwhile, it is tried again for a while."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + JOIN_WAIT_S
        while True:
            async with await self._connect(vmm, settings) as store:
                subj = subject("host", host_id)
                history, version = await store.read_aggregate(subj)
                if history:
                    return
                platform, reason = await self._platform()
                joined = HostJoined(
                    host_id=host_id,
                    vcpu=self.opts.host_vcpu,
                    memory_mb=self.opts.host_memory_mb,
                    address=socket.gethostname(),
                    public_ports=self.opts.allow_public_ports,
                    platform=platform,
                    platform_reason=reason,
                )
                store.timeout = 2.0
                try:
                    await store.append(subj, [joined], version)
                except PermissionDenied:
                    if loop.time() > deadline:
                        raise StoreError(
                            f"the NATS servers do not let key {vmm.name!r} write {subj}: is it "
                            "bound to this host on the keyring, and do the servers follow the "
                            "keyring (`pydstack host nats-config`)?"
                        ) from None
                    await asyncio.sleep(0.5)
                    continue
            _log.info("host joined", host_id=host_id, vcpu=joined.vcpu, memory_mb=joined.memory_mb)
            return

    async def _platform(self) -> tuple[str, str]:
        """HostJoined's platform fields when this up runs the host's VMM (the same answer
        its VMM gets: the probe runs once per process), so the VMM need not join again."""
        if not self.opts.vmm_backend:
            return "", ""
        from pydstack.actors.vmm import resolve_platform

        return await asyncio.to_thread(
            resolve_platform, self.opts.vmm_backend, self.opts.vmm_platform
        )

    def _serve_metrics(self) -> None:
        if self.opts.metrics_port < 0:
            return
        from pydstack.actors import metrics

        port = self.opts.metrics_port or free_port()
        try:
            self._stop_metrics = metrics.serve_metrics(port, "127.0.0.1")
        except OSError as exc:
            raise StoreError(
                f"metrics port {port} is unavailable ({exc.strerror}); choose another with "
                "--metrics-port"
            ) from None
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"

    def _close_metrics(self) -> None:
        if self._stop_metrics is not None:
            self._stop_metrics()

    async def _serve_dashboard(
        self, stack: contextlib.AsyncExitStack, operator: Identity, settings: StreamSettings
    ) -> None:
        """The web dashboard (pydstack.actors.dashboard); its commands sign as `operator`."""
        if self.opts.dashboard_port < 0:
            return
        from pydstack.actors.dashboard import Dashboard, DashboardConfig, EnvKeyError, GuardError

        store = await self._connect(operator, settings)
        stack.push_async_callback(_close, store)
        config = DashboardConfig(
            port=self.opts.dashboard_port,
            host=self.opts.dashboard_listen,
            # up's own KMS, else the first --kms-url; none: a dev key (--no-kms)
            kms_url=self.opts.dashboard_kms or next(iter(self.cvm_kms_urls()), ""),
            # only this cluster's root may sign an env key (its KMS CA pinned from the log)
            kms_cluster=self.kms.get("kms_cluster") or "main",
            kms_dev_pki=_dev_pki(self.data.path / "dev-pki") if _no_tdx() else None,
            dev_env_key=self.data.path / "dashboard" / "dev-env.key",
            allowed_hosts=self.opts.dashboard_hosts,
            login_token_file=self.data.path / "dashboard" / "login-token",
            tenants_dir=self.data.path / "dashboard" / "tenants",  # tenant add --dashboard
            identities_dir=self.data.identities.dir,
        )
        try:
            dash = await Dashboard.create(store, config)
        except (OSError, EnvKeyError, GuardError) as exc:
            raise StoreError(f"dashboard: {exc}; run without it with --dashboard-port -1") from None
        stack.push_async_callback(_bounded_call, dash.close, "dashboard")
        self.dashboard_url = dash.url
        self.dashboard_token_file = str(config.login_token_file)

    async def _run_actors(
        self, ids: dict[str, Identity], settings: StreamSettings, cfg: PlaneConfig
    ) -> None:
        from pydstack.actors import ActorRunner, RuntimeConfig, Scheduler, SchedulerConfig

        runtime = RuntimeConfig(reconcile_interval_s=self.opts.reconcile_interval_s)
        async with contextlib.AsyncExitStack() as stack:
            waits: set[asyncio.Task[Any]] = {asyncio.create_task(self._stop.wait(), name="stop")}
            if "scheduler" in ids:  # a host joined with a bundle runs none (it has no key)

                async def open_scheduler(inner: contextlib.AsyncExitStack) -> Failed:
                    store = await self._connect(ids["scheduler"], settings)
                    inner.push_async_callback(_close, store)
                    checkpoint = self.data.path / "scheduler" / "checkpoint.db"  # issue 18.1
                    sched_cfg = SchedulerConfig(name="scheduler", checkpoint=checkpoint)
                    scheduler = Scheduler(store, sched_cfg)
                    runner = await inner.enter_async_context(ActorRunner(store, scheduler, runtime))

                    async def failed() -> str:
                        await runner.wait()  # raises its failure
                        return "the actor stopped by itself"

                    return failed

                await self._keep(stack, "scheduler", open_scheduler)
            if self.opts.kms or (self.opts.kms is None and self.server is not None):
                await self._start_kms(stack, _needs(ids, "kms", "--no-kms"), settings)
            if "gateway" in ids or self.opts.gateway:
                gw = _needs(ids, "gateway", "--no-gateway, or `host add --gateway`")
                await self._start_gateway(stack, gw, settings, cfg)
            if "operator" in ids:
                await self._serve_dashboard(stack, ids["operator"], settings)
            if self.opts.vmm_backend and self.opts.host_id:
                await self._start_vmm(stack, _needs(ids, "vmm", "--vmm none"), settings, runtime)
            running = {"vmm": self.vmm_url, "kms": self.kms_url, "gateway": bool(self.gateway),
                       "dashboard": self.dashboard_url}  # fmt: skip
            self._ready(cfg, [*(["scheduler"] if "scheduler" in ids else []),
                              *(name for name, on in running.items() if on)])  # fmt: skip
            waits |= {kept.watching() for kept in self._kept}  # failures restart them now
            watcher = None
            if self.server is not None:
                watcher = asyncio.create_task(
                    keep_nats_server(self.server, self.nats_budget, self._restarted),
                    name="nats-server",
                )
                waits.add(watcher)
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if watcher in pending and not any(t.get_name() == "stop" for t in done):
                # An actor failed: if NATS died, the actors' timeouts are only the symptom, and
                # the watcher (reaping the process in a thread) will say so in a moment.
                done2, _ = await asyncio.wait({watcher}, timeout=2.0)
                done |= done2
                pending -= done2
            for task in pending | self._recording:
                task.cancel()
            failures = {
                t.get_name(): t.exception()
                for t in done
                if t.get_name() != "stop" and not t.cancelled()
            }  # retrieved here, so asyncio never logs them as unretrieved
            if "nats-server" in failures:  # the cause; actor failures would be its symptoms
                failures = {"nats-server": failures["nats-server"]}
            for name, exc in failures.items():
                if isinstance(exc, Crashing):  # names the component, its log and the stop
                    raise exc
                what = f"{name} ended" + (f": {exc}" if exc else "")
                raise StoreError(f"{what}; stopping the control plane")
            _log.info("stopping", reason="signal")
        # Leaving the stack stops the runner (in-flight event finished) and closes its store.

    async def _keep(self, stack: contextlib.AsyncExitStack, name: str, open: Opener) -> None:
        """Start a component `up` rebuilds in place when it fails (upkeep.KeptComponent);
        closed with `stack`. Its watch starts once `up` is ready."""
        kept = KeptComponent(name, open, RestartBudget(), self._restarted)
        await kept.start()
        stack.push_async_callback(kept.aclose)
        self._kept.append(kept)

    async def _start_kms(
        self, stack: contextlib.AsyncExitStack, ident: Identity, settings: StreamSettings
    ) -> None:
        """Run one KMS instance of cluster `main` with its own identity."""
        launch = self._kms_launch()
        from pydstack.actors.kms.client import KmsCallError
        from pydstack.actors.kms.pin import cluster_root, write_pin
        from pydstack.actors.kms.service import KmsError, NotOnboarded
        from pydstack.actors.kms.workers import WorkerFailed

        store = await self._connect(ident, settings)
        stack.push_async_callback(_close, store)
        try:
            self.kms_url = await stack.enter_async_context(
                _bounded(self._running_kms(store, ident, settings, launch), "kms")
            )
        except NotOnboarded as exc:
            raise StoreError(f"{exc}; or start without a KMS (--no-kms)") from None
        except (KmsError, KmsCallError, WorkerFailed) as exc:  # e.g. a refused onboarding
            raise StoreError(f"KMS: {exc}") from None
        # The data dir now knows its cluster and root: env keys are checked against them.
        created = await cluster_root(store, launch.cluster)
        assert created is not None  # the KMS serves: its root is on the log
        pin = await asyncio.to_thread(write_pin, self.data.path, created)
        self.kms = {
            "kms_cluster": pin.cluster, "kms_root": pin.k256_root, "kms_auth": launch.auth,
            "kms_onboard_token_file": launch.replica_token_file or None,
            # eth: the DstackKms it asks (not the RPC URL: a provider's URL may hold an API key)
            **({"kms_contract": launch.kms_contract} if launch.auth == "eth" else {}),
        }  # fmt: skip

    async def _start_vmm(
        self,
        stack: contextlib.AsyncExitStack,
        ident: Identity,
        settings: StreamSettings,
        runtime: Any,
    ) -> None:
        """This host's VMM (pydstack.actors.vmm) with its own `vmm` identity, when asked for."""
        if not (self.opts.vmm_backend and self.opts.host_id):
            return
        from pydstack.actors.vmm import VmmConfig, VmmLaunch, running_vmm

        config = VmmConfig(
            host_id=self.opts.host_id, state_dir=self.data.path / "vmm",
            vcpu=self.opts.host_vcpu, memory_mb=self.opts.host_memory_mb,
            kms_urls=self.cvm_kms_urls(), allow_public_ports=self.opts.allow_public_ports,
            **await asyncio.to_thread(self._cvm_gateway),
        )  # fmt: skip
        launch = VmmLaunch(config=config, backend=self.opts.vmm_backend,
                           api_host=self.opts.host or "127.0.0.1", api_port=self.opts.vmm_api_port,
                           runtime=runtime, guest_services=self._guest_services(),
                           platform=self.opts.vmm_platform,
                           registry_mirrors=self.opts.registry_mirrors,
                           dev_pki=await asyncio.to_thread(self._cvm_dev_pki))  # fmt: skip

        async def open_vmm(inner: contextlib.AsyncExitStack) -> Failed:
            store = await self._connect(ident, settings)
            inner.push_async_callback(_close, store)
            vmm, api = await inner.enter_async_context(_bounded(running_vmm(store, launch), "vmm"))
            self.vmm_url = api.url  # the same socket and port every time
            self.vmm_api = {
                "vmm_socket": str(api.socket) if api.socket else None,
                "vmm_tcp_url": api.tcp_url or None,
                "vmm_token_file": str(api.token_file) if api.token_file else None,
            }
            failed: Failed = vmm.failed
            return failed

        await self._keep(stack, "vmm", open_vmm)
        await self._register_host_images()

    async def _register_host_images(self) -> None:
        """Put this host's images on the log (as admin), so the KMS can measure its CVMs
        against them; a host joined with a bundle has no admin key: `image register` there."""
        from pydstack.actors.image_registry import host_image_registrations, register_image

        backend = self.opts.vmm_backend or ""
        if self.admin_store is None:
            why = "no admin key here; run `pydstack image register DIR` on the admin host"
            _log.warning("this host's images are not registered", why=why, backend=backend)
            return
        try:
            regs = await asyncio.to_thread(
                host_image_registrations, backend, self.data.path / "vmm"
            )
        except (OSError, ValueError) as exc:  # ImageError is a ValueError: a broken image
            raise StoreError(f"vmm: an image of this host cannot be measured: {exc}") from None
        for reg in regs:
            if await register_image(self.admin_store, reg):
                _log.info("image registered", image=reg.name, os_image_hash=reg.os_image_hash)

    def cvm_kms_urls(self) -> tuple[str, ...]:
        """sys-config of this host's CVMs: the KMS replicas their boot tries in turn, up's own
        first, then the --kms-url ones (each once)."""
        return tuple(dict.fromkeys(u for u in (self.kms_url, *self.opts.kms_urls) if u))

    def _cvm_gateway(self) -> dict[str, Any]:
        """sys-config of this host's CVMs: up's gateway registration URL and the CA it uses."""
        url = self.gateway.get("gateway_registration_url")
        if not url:
            return {}
        return {"gateway_urls": (url,), "gateway_ca": Path(self.gateway["gateway_ca"]).read_text()}

    def _guest_services(self) -> HostServices:
        """What this host's QEMU guests may reach on it (adapters.firewall): the KMS replicas,
        up's gateway (registration, WireGuard) and a loopback resolver slirp relays DNS to."""
        from pydstack.adapters.firewall import HostServices, RulesError, resolver_ports, url_ports

        gw = self.gateway
        try:
            resolv = Path("/etc/resolv.conf").read_text()
        except OSError:
            resolv = ""
        registration = gw.get("gateway_registration_url")
        try:
            return HostServices(
                kms=url_ports(self.cvm_kms_urls()),
                gateway_registration=url_ports([registration]) if registration else (),
                wireguard=(gw["gateway_wireguard_port"],) if "gateway_wireguard_port" in gw else (),
                registry=url_ports(self.opts.registry_mirrors),
                dns=resolver_ports(resolv),
            )
        except RulesError as exc:
            raise StoreError(f"guest egress rules: {exc}; check --kms-url") from None

    def _cvm_dev_pki(self) -> Path | None:
        """Without TDX, sandbox CVMs quote with the dev PKI that this KMS trusts."""
        dev = not Path("/sys/kernel/config/tsm/report").exists()
        return _dev_pki(self.data.path / "dev-pki") if dev else None

    async def _start_gateway(
        self,
        stack: contextlib.AsyncExitStack,
        ident: Identity,
        settings: StreamSettings,
        cfg: PlaneConfig,
    ) -> None:
        """One gateway node in the host namespace (pydstack.actors.gateway.up_launch)."""
        from pydstack.actors.gateway.node_launch import RunningNode, running_node
        from pydstack.actors.gateway.up_launch import up_launch
        from pydstack.adapters.wireguard import BackendUnavailable, WireGuardError, pick_backend

        o = self.opts
        if o.gateway is False or (o.gateway is None and not self.kms_url):
            return
        reason = None
        try:  # the kernel's WireGuard or wireguard-go (the node picks again and reports it)
            await pick_backend("auto", run_dir=self.data.path)
        except BackendUnavailable as exc:
            reason = str(exc)
        if reason is not None:
            if o.gateway:
                raise StoreError(f"gateway: {reason}; or start without it (--no-gateway)")
            _log.warning("no gateway node", reason=reason)
            return
        gw = self._gateway_options(cfg)

        async def open_node(inner: contextlib.AsyncExitStack) -> Failed:
            store = await self._connect(ident, settings)
            inner.push_async_callback(_close, store)
            try:
                launch = await up_launch(store, self.data.path, gw)
                rn: RunningNode = await inner.enter_async_context(
                    _bounded(running_node(store, launch), "gateway")
                )
            except (WireGuardError, OSError) as exc:
                raise StoreError(f"gateway: {exc}; or start without it (--no-gateway)") from None
            # the same ports every time (DATA/gateway/ports.json) but the admin API's
            self.gateway = {
                "gateway_admin_url": rn.admin_url, "gateway_registration_url": rn.registration_url,
                "gateway_proxy": f"{gw.listen}:{rn.proxy_port}", "gateway_domain": gw.domain,
                "gateway_ca": str(self.data.path / "gateway" / "ca.pem"),
                "gateway_wireguard_port": rn.node.config.listen_port,
            }  # fmt: skip
            self._state.update(self.gateway)
            return rn.node.failed

        await self._keep(stack, "gateway", open_node)

    def _gateway_options(self, cfg: PlaneConfig) -> UpGateway:
        from pydstack.actors.gateway.up_launch import UpGateway

        o = self.opts
        dev = not Path("/sys/kernel/config/tsm/report").exists()
        return UpGateway(
            domain=o.gateway_domain, listen=o.gateway_listen or cfg.host, proxy_port=o.gateway_port,
            node_id=o.gateway_node_id,
            dev_pki=str(_dev_pki(self.data.path / "dev-pki")) if dev else None,
            acme_directory=o.gateway_acme_directory,
            acme_ca_bundle=o.gateway_acme_ca_bundle or None, challtestsrv=o.gateway_challtestsrv,
            rfc2136=o.gateway_rfc2136,
            forward_guard=o.gateway_forward_guard, log_auth=(o.kms_auth or "log") == "log",
        )  # fmt: skip

    def _running_kms(
        self, store: EventStore, ident: Identity, settings: StreamSettings, launch: KmsLaunch
    ) -> contextlib.AbstractAsyncContextManager[str]:
        """The KMS in this process, or (`kms_workers` > 1) as worker processes logging in
        with the kms identity's seed file."""
        from pydstack.actors.kms.launch import LaunchError, running_kms
        from pydstack.actors.kms.workers import running_kms_workers
        from pydstack.adapters.nats import DEFAULT_STREAM

        if self.opts.kms_workers <= 1:
            return running_kms(store, launch)
        if settings.name != DEFAULT_STREAM:
            raise LaunchError(f"--kms-workers runs on stream {DEFAULT_STREAM} only, not "
                              f"{settings.name}: leave --kms-workers at 1")  # fmt: skip
        ids = self.data.identities
        return running_kms_workers(
            launch, self.opts.kms_workers, nats_url=self.url,
            seed_file=str(ids.path(ident.name)), keyring=str(ids.keyring_path),
        )  # fmt: skip

    def _kms_launch(self) -> KmsLaunch:
        """KMS options: a dev PKI + simulated TD where the host has no TDX, else the guest agent."""
        from pydstack.actors.kms.launch import KmsLaunch

        kms_dir = self.data.path / "kms"
        kms_dir.mkdir(mode=0o700, exist_ok=True)
        dev = not Path("/sys/kernel/config/tsm/report").exists()
        auth = self.opts.kms_auth or "log"  # dev only when asked: it allows every app
        if auth == "dev":
            _log.warning(
                "KMS authorization is 'dev': EVERY attested app gets keys. Development only; "
                "use --kms-auth webhook --kms-auth-url URL for anything else"
            )
        # On the listen address, so CVMs and KMS replicas on other hosts reach it.
        host = self.opts.host if self.opts.host not in ("", None, "0.0.0.0", "::") else "127.0.0.1"
        return KmsLaunch(
            key_file=str(kms_dir / "root.sealed"),
            host=host,
            port=self.opts.kms_port or (9100 if not port_in_use(host, 9100) else 0),
            onboard_from=self.opts.kms_onboard,
            onboard_token_file=self.opts.kms_onboard_token_file,
            # log and dev authorize no KMS: replicas present this token (0600) instead
            replica_token_file=str(kms_dir / "onboard-token") if auth in ("log", "dev") else "",
            allow_mrs=self.opts.kms_allow_mrs,
            # replicas sharing an identity differ by it
            instance_id=self.opts.kms_instance or self.opts.host_id or "",
            seal_appkeys=str(_dev_appkeys(kms_dir)) if dev else None,
            guest_agent=None if dev else "/var/run/dstack.sock",
            auth=auth,
            auth_url=self.opts.kms_auth_url,
            eth_rpc_url=self.opts.kms_eth_rpc_url,
            kms_contract=self.opts.kms_contract,
            allow_dev_auth=auth == "dev",
            dev_pki=str(_dev_pki(self.data.path / "dev-pki")) if dev else None,
        )

    def _restarted(self, event: Restarted) -> None:
        """After the embedded server came back: state.json names its new pid, and the restart
        goes on the log (in the background: appends work again once clients reconnected)."""
        self.restarts[event.component] = self.restarts.get(event.component, 0) + 1
        self._write_state()
        task = asyncio.create_task(self._record(event), name=f"record-{event.component}")
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    async def _record(self, event: Restarted) -> None:
        """Append ComponentRestarted under the admin key (the write policy lets only admin
        write on dstack.actor.*); retried until the log takes it, once (its event id)."""
        from pydstack.adapters.nats import ConflictError, new_event_id
        from pydstack.core.events import CodecError, ComponentRestarted, open_envelope

        def landed(data: bytes) -> bool:
            try:
                return open_envelope(data).id == eid
            except CodecError:
                return False

        store = self.admin_store
        if store is None:  # a joined host runs no embedded server; nothing to record
            return
        subj = subject("actor", event.component)
        body = ComponentRestarted(
            component=event.component, host=self._host(), reason=event.reason,
            down_ms=round(event.down_s * 1000), crashes=event.recent,
        )  # fmt: skip
        eid = new_event_id()
        while True:
            try:
                history, version = await store.read_aggregate(subj)
                if any(landed(rec.data) for rec in history):
                    return  # an earlier try landed after all
                await store.append(subj, [body], version, event_ids=[eid])
            except ConflictError:
                continue
            except (StoreError, nats.errors.Error, TimeoutError) as exc:
                _log.debug("restart not recorded yet", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            _log.info("restart recorded", subject=subj, reason=event.reason)
            return

    async def _stop_server(self) -> None:
        if self.server is not None:
            await self.server.stop()
            _log.info("nats-server stopped")

    def _write_state(self) -> None:
        proc = self.server.proc if self.server is not None else None
        state = {**self._state, "nats_pid": proc.pid if proc else None, "restarts": self.restarts}
        tmp = self.data.state_path.with_suffix(".tmp")  # readers never see half a file
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.data.state_path)

    def _ready(self, cfg: PlaneConfig, actors: list[str]) -> None:
        state = {
            "pid": os.getpid(), "nats_url": self.url, "stream": cfg.stream,
            "metrics_url": self.metrics_url, "kms_url": self.kms_url or None, **self.kms,
            "actors": actors, "started": time.time(),
            "embedded": self.server is not None, "dashboard_url": self.dashboard_url,
            "dashboard_login_token_file": self.dashboard_token_file or None,
            "vmm_url": self.vmm_url or None, **self.vmm_api, **self.gateway,
            "registry_url": self.opts.registry_url or None,
            "registry_mirrors": list(self.opts.registry_mirrors) or None,
            "tee": "simulated" if _no_tdx() else "tdx",
        }  # fmt: skip
        self._state = state
        self._write_state()
        where: dict[str, Any] = {
            "nats_url": self.url, "data_dir": str(self.data.path), "stream": cfg.stream,
            "actors": actors, "metrics": self.metrics_url or None,
            "dashboard": self.dashboard_url or None,
            "dashboard_login_token_file": self.dashboard_token_file or None,
            "kms": self.kms_url or None,
            "vmm": self.vmm_url or None,
            **({"kms_auth": "dev: every attested app gets its keys; the KMS authorized itself "
                "unchecked; replicas need the onboarding token",
                "kms_onboard_token_file": self.kms["kms_onboard_token_file"]}
               if self.kms.get("kms_auth") == "dev" else {}),
            "gateway": self.gateway.get("gateway_proxy"),
            "identities": str(self.data.identities.dir),
            **({"attestation": SIMULATED_TDX} if _no_tdx() else {}),
        }  # fmt: skip
        if self.server is not None:
            where["nats_log"] = str(self.server.log_path)
        if _no_tdx():
            _log.warning(SIMULATED_TDX)
        gc.freeze()  # start-up objects (modules, keys, folded state) leave the cyclic GC, so
        # its gen-2 passes stay cheap per request (they cost the KMS ~2 ms per GetAppKey)
        _log.info(
            "control plane ready",
            **where,
            hint="pydstack events --follow  |  pydstack status  |  Ctrl-C to stop",
        )


def _needs(ids: dict[str, Identity], role: str, instead: str) -> Identity:
    if role not in ids:
        raise StoreError(f"this data dir holds no {role} key (joined with a bundle without "
                         f"one); start with {instead}")  # fmt: skip
    return ids[role]


def _report_follower(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error("following the keyring for NATS users failed; `up` must be restarted to "
                   "apply later keyring changes", error=str(task.exception()))  # fmt: skip


# Simulation is never silent: the ready banner, `status` and `deploy` say this.
SIMULATED_TDX = (
    "SIMULATED TDX: no TDX on this host, quotes are signed by the dev PKI in DATA/dev-pki; "
    "attestation proves nothing, nothing is confidential (development and tests only)"
)


def _no_tdx() -> bool:
    return not Path("/sys/kernel/config/tsm/report").exists()


def _dev_pki(path: Path) -> Path:
    """The simulator PKI this dev control plane trusts (made once; guests load the same one)."""
    from pydstack.adapters.tdx.pki import DevPki

    if not (path / "root.der").exists():
        DevPki.generate().save(path)
    return path


def _dev_appkeys(kms_dir: Path) -> Path:
    """Key-provider keys that seal the dev KMS's root keys at rest (0600)."""
    from pydstack.adapters.secretfile import write_secret
    from pydstack_guest import create_dev_app_keys

    path = kms_dir / "appkeys.json"
    if not path.exists():
        _, text = create_dev_app_keys(os.urandom(20), now=int(time.time()))
        write_secret(path, text)
    return path


STOP_GRACE_S: Final = 15.0


class _bounded(contextlib.AbstractAsyncContextManager[Any]):
    """Wrap a component's context so a stop that hangs cannot keep `up` from exiting: after
    STOP_GRACE_S it is abandoned with an error line naming it (its processes die with us)."""

    def __init__(self, cm: contextlib.AbstractAsyncContextManager[Any], name: str) -> None:
        self.cm, self.name = cm, name

    async def __aenter__(self) -> Any:
        return await self.cm.__aenter__()

    async def __aexit__(self, et: Any, e: Any, tb: Any) -> bool | None:
        try:
            async with asyncio.timeout(STOP_GRACE_S):
                return await self.cm.__aexit__(et, e, tb)
        except TimeoutError:
            _log.error("component did not stop in time; abandoned", component=self.name,
                       grace_s=STOP_GRACE_S)  # fmt: skip
            return None


async def _bounded_call(close: Callable[[], Coroutine[Any, Any, Any]], name: str) -> None:
    try:
        async with asyncio.timeout(STOP_GRACE_S):
            await close()
    except TimeoutError:
        _log.error("component did not stop in time; abandoned", component=name)
