"""Fleet simulator: N simulated hosts x M CVMs against the real scheduler, KMS, gateways, NATS.

    python -m bench.scale [--quick] [--hosts N] [--cvms M] [--gateways K]
    # --quick: 5 hosts x 20 CVMs; 3 gateway nodes (root, wireguard-go; --gateways 0: none)

A LOAD GENERATOR, not a fleet: each host is a real VMM actor (``actors.vmm.running_vmm``, its
own NATS connection, supervisor and durable consumer, run as a task of this process) on the
"sim" CVM backend (``adapters.sim``): a CVM is a tiny process that boots instantly, no VM, no
TEE; the host reports platform "sim" with a reason saying it is a load generator. What it
appends is what a real host appends (HostJoined, heartbeats, VmStarted, boot progress). Each
CVM's boot then asks the real KMS (a ``python -m pydstack.actors.kms`` process, dev PKI, dev
auth) for its keys as a guest does (``pydstack_guest.KmsKeyProvider``: GetTempCaCert, then
GetAppKey and GetMeta over mutual RA-TLS with a quote simulated by the dev PKI), at the KMS
URL the VMM wrote into its sys-config, then sends RegisterCvm to the gateway nodes its
sys-config names (``bench._scale_gateways``: real node processes in namespaces). These
simulated guests' calls run in a process of their own (``bench._scale_guests``), never in
the VMMs'. The scheduler is the real one, as its own process (``python -m
pydstack.actors.scheduler``); after the storm the real dashboard's VMs page is timed in
headless Chromium (``dashboard_s``), and each process's peak RSS is read (``rss_mb``).

GetAppKey and RegisterCvm latencies are as the simulated guests see them: with every CVM
booting at once, they include the wait for the guests' own process (one event loop doing
every guest's quotes and TLS), not only the KMS's and the nodes' time.

Placement, start and ready times come from the log (server time of each event). Reported:
placed/started/ready per second over the storm, time to N x M ready, placement lag
(requested → VmScheduled) and VMM lag (scheduled → VmStarted) p50/p99, KMS GetAppKey
p50/p99 under the storm, RegisterCvm per second and p50/p99, ``converge_s`` (the nodes'
tables and WireGuard peers identical after the last registration), double bookings (a VM
scheduled twice, or a host over its capacity), and, as the baseline in the same run, the
raw append rate of this NATS server (as many events as CVMs, 32 in flight).
Any failed request (VmRejected, a boot error, a KMS or gateway
failure, a VM not ready in time) makes the exit status 1. Last line: JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench._common import bench_signer, finish, percentile, temp_server
from bench._scale_gateways import Gateways, gateway_nodes
from bench._scale_guests import GuestFarm
from bench._scale_log import VM_MB, Watch, double_bookings, lag
from pydstack.actors.vmm import VmmConfig, VmmLaunch, running_vmm
from pydstack.adapters.cvm import SYS_CONFIG, CvmSpec
from pydstack.adapters.nats import NEW, EventStore, NatsServer, NatsServerConfig
from pydstack.adapters.secretfile import write_secret
from pydstack.adapters.sim import BootHook, Report, SimBackend, SimConfig
from pydstack.adapters.supervisor import SupervisorClient, launch_supervisor
from pydstack.adapters.tdx.pki import DevPki
from pydstack.core.events import (
    ComponentRestarted,
    VmRequested,
    VmResources,
    subject,
)
from pydstack.logs import configure
from pydstack_guest import create_dev_app_keys
from tests.gateway.simcvm import DevCa
from tests.gateway_nodes.lan import namespace_lan
from tests.images import register_test_image
from tests.kms.conftest import APP_ID


class Storm:
    """What the CVMs' boots saw: GetAppKey latencies and failures, in words."""

    def __init__(self) -> None:
        self.kms_ms: list[float] = []
        self.failures: list[str] = []


def sim_boot(farm: GuestFarm, storm: Storm, gws: Gateways | None) -> BootHook:
    """The host side of a sim CVM's boot, done by the simulated guests' process (``farm``):
    its keys from the KMS its sys-config names, then RegisterCvm with the gateways it names,
    each in turn. Their answers become the CVM's boot stages."""

    async def boot(spec: CvmSpec, report: Report) -> None:
        sys_config = json.loads(spec.shared_files.get(SYS_CONFIG, b"{}"))
        urls = sys_config.get("kms_urls") or []
        if not urls:
            raise RuntimeError("sys-config names no KMS")
        gateways = (sys_config.get("gateway_urls") or []) if gws is not None else []
        answers = await farm.boot(spec.vm_id, urls[0], gateways)
        while True:
            msg = await answers.get()
            if "error" in msg:
                storm.failures.append(f"{spec.vm_id}: {msg['error']}")
                raise RuntimeError(msg["error"])
            if msg["stage"] == "keys":
                storm.kms_ms.append(msg["ms"])
                report("keys", f"from KMS {urls[0]} (simulated quote: load generator)")
            elif msg["stage"] == "gateway" and gws is not None:
                gws.register_ms.append(msg["ms"])
                gws.last_at = max(gws.last_at, msg["at"])
                report("gateway", f"registered with {msg['url']} (simulated client certificate)")
            elif msg["stage"] == "done":
                return

    return boot


@contextlib.asynccontextmanager
async def kms_process(
    tmp: Path, nats_url: str, pki: DevPki, pids: dict[str, int]
) -> AsyncIterator[str]:
    """The real KMS (as bench.kms runs it), its URL; its pid goes into ``pids``."""
    pki.save(tmp / "pki")
    (tmp / "appkeys.json").write_text(create_dev_app_keys(b"\x01" * 20, now=0)[1])
    seed = tmp / "kms-identity.seed"
    write_secret(seed, os.urandom(32).hex())
    proc = subprocess.Popen(
        [sys.executable, "-m", "pydstack.actors.kms", "--nats", nats_url, "--port", "0",
         "--key-file", str(tmp / "root"), "--seal-appkeys", str(tmp / "appkeys.json"),
         "--auth", "dev", "--allow-dev-auth", "--dev-pki", str(tmp / "pki"),
         "--signer-seed-file", str(seed)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    pids["kms"] = proc.pid
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        yield line.decode().strip().split("=", 1)[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 10)


@contextlib.asynccontextmanager
async def scheduler_process(
    tmp: Path, nats_url: str, store: EventStore, pids: dict[str, int]
) -> AsyncIterator[None]:
    """The real scheduler as its own process (``python -m pydstack.actors.scheduler``): its
    placement lag is not the load generator's CPU. Ready once its durable consumer exists."""
    key = tmp / "scheduler.key"
    write_secret(key, os.urandom(32).hex())
    proc = subprocess.Popen(
        [sys.executable, "-m", "pydstack.actors.scheduler", "--nats", nats_url,
         "--key-file", str(key), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=(tmp / "scheduler.log").open("ab"),
    )  # fmt: skip
    pids["scheduler"] = proc.pid
    try:
        js = store.nc.jetstream()
        deadline = time.monotonic() + 30
        while True:
            try:
                await js.consumer_info(store.settings.name, "scheduler")
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the scheduler did not start; see scheduler.log") from None
                await asyncio.sleep(0.2)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 15)


async def raw_append_rate(store: EventStore, n: int) -> float:
    """Baseline: events appended per second straight to NATS (no actor reads them: a restart
    note on an actor subject, about the size of a VmRequested), 32 in flight."""
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        ev = ComponentRestarted(component=f"raw-{i}", host="bench", reason="x" * 120)
        async with sem:
            await store.append(subject("actor", f"raw-{i}"), [ev], NEW)

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t)


async def run(
    n_hosts: int,
    m: int,
    timeout_s: float,
    n_gw: int,
    guests: bool = True,
    dashboard: bool = True,
    guest_concurrency: int = 16,
) -> dict[str, Any]:
    pki, storm, w = DevPki.generate(), Storm(), Watch()
    vms = [f"sim-{i:05d}" for i in range(n_hosts * m)]
    gws: Gateways | None = None
    converge_s = float("nan")
    supervisors: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="pydstack-bench-scale-") as d:
        tmp = Path(d)
        async with contextlib.AsyncExitStack() as stack:
            if n_gw:  # the nodes live in namespaces of a LAN: NATS listens on it
                lan = await stack.enter_async_context(namespace_lan())
                nats = NatsServer(NatsServerConfig(data_dir=tmp / "nats", host=lan.host_ip))
                await nats.start()
                stack.push_async_callback(nats.stop)
            else:
                nats = await stack.enter_async_context(temp_server())
            admin = await EventStore.connect(nats.url, bench_signer("admin"))
            stack.push_async_callback(admin.close)
            await admin.ensure_stream()
            await register_test_image(admin)  # the KMS serves only TDs of an image on the log
            raw_rate = await raw_append_rate(admin, n_hosts * m)
            follower = asyncio.create_task(w.follow(admin, await admin.last_seq() + 1))
            stack.push_async_callback(_cancel, follower)
            stack.callback(_stop_all, supervisors)
            if n_gw:
                gws = await stack.enter_async_context(
                    gateway_nodes(lan, tmp / "gw", nats.url, pki, n_gw))  # fmt: skip
            pids = {"nats_server": nats.proc.pid if nats.proc else 0}
            kms_url = await stack.enter_async_context(kms_process(tmp, nats.url, pki, pids))
            farm = await GuestFarm.start(pki, gws.ca if gws else DevCa.create(), tmp,
                                         guest_concurrency)  # fmt: skip
            stack.push_async_callback(farm.aclose)
            pids["simulated_guests"] = farm.proc.pid
            await stack.enter_async_context(scheduler_process(tmp, nats.url, admin, pids))
            for node in gws.nodes if gws else []:
                pids[node.node_id] = node.proc.pid if node.proc else 0
            # this process: the VMM actors, the log watcher, later the dashboard
            pids["vmm_hosts_and_bench"] = os.getpid()
            for h in range(n_hosts):
                sd = tmp / f"host{h}"
                sock = sd / "supervisor.sock"
                supervisors.append(launch_supervisor(sock, sd / "supervisor"))
                store = await EventStore.connect(nats.url, bench_signer("vmm"))
                stack.push_async_callback(store.close)
                stack.push_async_callback(_remove_all, sock, sd / "vms")  # after the VMM
                urls = gws.urls[h % n_gw :] + gws.urls[: h % n_gw] if gws else ()  # nearest first
                cfg = VmmConfig(host_id=f"sim{h}", state_dir=sd, vcpu=m, memory_mb=m * VM_MB,
                                kms_urls=(kms_url,), gateway_urls=urls)  # fmt: skip
                launch = VmmLaunch(config=cfg, supervisor_socket=sock, api_socket=False,
                                   sim=SimConfig(vms_dir=sd / "vms", boot=sim_boot(
                                       farm, storm, gws) if guests else None))  # fmt: skip
                await stack.enter_async_context(running_vmm(store, launch))
            await w.until(lambda: len(w.hosts) >= n_hosts, 30)
            sim_hosts = sum(j.platform == "sim" for j in w.hosts.values())
            t0 = time.time()
            converging = None  # the nodes' tables watched from now: the first time they agree
            if gws is not None and guests:
                converging = asyncio.create_task(gws.converged_at(len(vms), timeout_s + 30))
                stack.push_async_callback(_cancel, converging)
            await _request_all(admin, vms)
            done = await w.until(lambda: w.count("ready") + len(w.errors) >= len(vms), timeout_s)
            w.frozen = True
            if converging is not None:
                try:
                    at = await converging
                    converge_s = at - gws.last_at if gws is not None else converge_s
                except AssertionError as exc:
                    storm.failures.append(f"gateways did not converge: {exc}"[:300])
            rss = {name: peak_rss_mb(pid) for name, pid in pids.items()}
            dashboard_s = float("nan")
            if dashboard:
                try:
                    dashboard_s = await dashboard_first_paint(admin, vms, tmp)
                except Exception as exc:
                    storm.failures.append(f"dashboard: {type(exc).__name__}: {exc}"[:300])
    r = _result(w, vms, storm, t0, done, raw_rate, n_hosts, m, sim_hosts)
    r["rss_mb"] = rss
    r["dashboard_s"] = dashboard_s
    r["guest_concurrency"] = guest_concurrency
    if gws is not None:
        g = gws.register_ms
        r.update(gateway_nodes=n_gw, gateway_registrations=len(g),
                 gateway_registrations_per_s=len(g) / (gws.last_at - t0) if g else 0.0,
                 gateway_register_p50_ms=percentile(g, 50),
                 gateway_register_p99_ms=percentile(g, 99), converge_s=converge_s)  # fmt: skip
    return r


async def dashboard_first_paint(store: EventStore, vms: list[str], tmp: Path) -> float:
    """Seconds from opening the real dashboard's VMs page in headless Chromium (Debian's) to
    its table holding every VM. The dashboard (this process, after the storm) has folded the
    log first: what is timed is the page's load, JSON and render, not the fold."""
    from playwright.async_api import async_playwright

    from pydstack.actors.dashboard import Dashboard, DashboardConfig
    from tests.dashboard.support import CHROMIUM, FLAGS

    async with await Dashboard.create(store, DashboardConfig(port=0)) as dash:
        deadline = time.monotonic() + 60
        while len(dash.state.proj.vms) < len(vms):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard folded {len(dash.state.proj.vms)} VMs")
            await asyncio.sleep(0.1)
        async with async_playwright() as p:
            ctx = await p.chromium.launch_persistent_context(
                str(tmp / "chromium"), executable_path=CHROMIUM, headless=True, args=FLAGS,
                viewport={"width": 1400, "height": 900},
            )  # fmt: skip
            try:
                page = await ctx.new_page()
                t = time.perf_counter()
                await page.goto(f"{dash.url}vms")
                await page.wait_for_selector("main[data-loaded]", timeout=60_000)
                await page.wait_for_function(
                    f"document.querySelectorAll('tr[data-vm]').length >= {len(vms)}",
                    timeout=60_000,
                )
                return time.perf_counter() - t
            finally:
                await ctx.close()


def peak_rss_mb(pid: int) -> float | None:
    """A process's peak resident set (VmHWM), MB; None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def _stop_all(supervisors: list[subprocess.Popen[bytes]]) -> None:
    for sv in supervisors:
        sv.terminate()
    for sv in supervisors:
        sv.wait(30)


async def _request_all(store: EventStore, vms: list[str]) -> None:
    sem = asyncio.Semaphore(32)

    async def one(vm: str) -> None:
        ev = VmRequested(vm_id=vm, app_id=APP_ID.hex(), name=vm, image="sim",
                         resources=VmResources(vcpu=1, memory_mb=VM_MB))  # fmt: skip
        async with sem:
            await store.append(subject("vm", vm), [ev], NEW)

    await asyncio.gather(*(one(vm) for vm in vms))


async def _remove_all(sock: Path, vms_dir: Path) -> None:
    """CVMs outlive their VMM by design, not a bench run: once the VMM stopped (so it does not
    react to their end), each is removed through a backend of its own on the same supervisor."""
    sv = SupervisorClient(sock)
    try:
        backend = SimBackend(SimConfig(vms_dir=vms_dir), sv)
        for st in await backend.list():
            with contextlib.suppress(Exception):
                await backend.remove(st.vm_id)
        await sv.shutdown_if_idle()
    finally:
        await sv.close()


def _result(w: Watch, vms: list[str], storm: Storm, t0: float, done: bool, raw_rate: float,
            n_hosts: int, m: int, sim_hosts: int) -> dict[str, Any]:  # fmt: skip
    def last(step: str) -> float:
        return max((w.t[v][step] for v in vms if step in w.t[v]), default=float("nan"))

    ready = w.count("ready")
    all_ready_s = last("ready") - t0 if ready == len(vms) else float("nan")
    errors = list(w.errors) + [f for f in storm.failures if f not in w.errors]
    if not done or ready < len(vms):
        errors.append(f"{len(vms) - ready} of {len(vms)} CVMs not ready in time")
    placed, started = lag(w, vms, "requested", "scheduled"), lag(w, vms, "scheduled", "started")
    return {
        "load_generator": "sim backend: no VM, no TEE (adapters.sim)",
        "hosts": n_hosts, "cvms_per_host": m, "cvms": len(vms), "sim_hosts": sim_hosts,
        "placed_per_s": w.count("scheduled") / (last("scheduled") - t0),
        "started_per_s": w.count("started") / (last("started") - t0),
        "ready_per_s": ready / (last("ready") - t0),
        "all_ready_s": all_ready_s,
        "placement_p50_ms": percentile(placed, 50), "placement_p99_ms": percentile(placed, 99),
        "vmm_lag_p50_ms": percentile(started, 50), "vmm_lag_p99_ms": percentile(started, 99),
        "kms_getappkey_p50_ms": percentile(storm.kms_ms, 50),
        "kms_getappkey_p99_ms": percentile(storm.kms_ms, 99),
        "kms_calls": len(storm.kms_ms),
        "double_bookings": double_bookings(w, vms),
        "heartbeats": w.heartbeats,
        "raw_append_per_s": raw_rate,
        "gateway_registrations_per_s": None,  # set by run() when gateway nodes ran
        "errors": len(errors), "error_examples": errors[:3],
        "cpus": os.cpu_count(),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 hosts x 20 CVMs")
    ap.add_argument("--hosts", type=int)
    ap.add_argument("--cvms", type=int, help="CVMs per host")
    ap.add_argument("--gateways", type=int, default=3,
                    help="gateway nodes (root and wireguard-go); 0: no gateway")  # fmt: skip
    ap.add_argument("--no-guest-calls", action="store_true",
                    help="CVMs call no KMS or gateway: the VMMs' lag without the simulated "
                    "guests' client work in their process")  # fmt: skip
    ap.add_argument(
        "--no-dashboard",
        action="store_true",
        help="skip the dashboard's first paint (needs /usr/bin/chromium)",
    )
    ap.add_argument(
        "--guest-concurrency",
        type=int,
        default=16,
        help="simulated guests booting at once (KMS and gateway calls in flight)",
    )
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for all to be ready")
    a = ap.parse_args()
    configure(level="warning")  # the actors' per-event lines would swamp the figures
    n_hosts = a.hosts or (5 if a.quick else 100)
    m = a.cvms or (20 if a.quick else 100)
    if a.no_guest_calls:
        a.gateways = 0
    if a.gateways and (os.geteuid() != 0 or shutil.which("wireguard-go") is None):
        print("bench.scale: gateway nodes need root and wireguard-go; or pass --gateways 0",
              file=sys.stderr)  # fmt: skip
        return 2
    r = asyncio.run(run(n_hosts, m, a.timeout, a.gateways, not a.no_guest_calls,
                        not a.no_dashboard, a.guest_concurrency))  # fmt: skip
    if a.no_guest_calls:
        print("no guest calls: the CVMs asked no KMS and no gateway", flush=True)
    print(f"LOAD GENERATOR (sim backend, no VM): {r['cvms']} CVMs on {n_hosts} sim hosts, "
          f"all ready in {r['all_ready_s']:.2f} s; placed {r['placed_per_s']:.0f}/s, "
          f"started {r['started_per_s']:.0f}/s; placement p99 {r['placement_p99_ms']:.0f} ms, "
          f"VMM lag p99 {r['vmm_lag_p99_ms']:.0f} ms; KMS GetAppKey p50 "
          f"{r['kms_getappkey_p50_ms']:.0f} ms p99 {r['kms_getappkey_p99_ms']:.0f} ms; "
          f"raw NATS append {r['raw_append_per_s']:.0f}/s; dashboard first paint "
          f"{r['dashboard_s']:.2f} s")  # fmt: skip
    if r.get("gateway_nodes"):
        print(f"gateways: {r['gateway_registrations']} RegisterCvm through {r['gateway_nodes']} "
              f"nodes, {r['gateway_registrations_per_s']:.0f}/s, p99 "
              f"{r['gateway_register_p99_ms']:.0f} ms; tables identical {r['converge_s']:.2f} s "
              "after the last")  # fmt: skip
    for e in r["error_examples"]:
        print(f"error: {e}", file=sys.stderr)
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
    # a double booking is a failed placement: it fails the run as a failed request does
    return finish(clean, errors=r["errors"] + r["double_bookings"], attempts=r["cvms"],
                  what="bench.scale CVMs")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
