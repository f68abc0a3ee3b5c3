"""The process that *is* a sandbox CVM: ``python -m pydstack.adapters.sandbox.guest WORKDIR``.

Run by the supervisor in the host's network namespace, it binds the host side of the port
maps, then moves into the CVM's namespace for good and there starts a docker engine of its own,
the guest agent (pydstack_guest on the simulated TDX backend, serving the dstack socket that
every app container gets at /var/run/dstack.sock, and the same API on the CVM's loopback,
``DSTACK_AGENT_URL``), imports the image's rootfs and runs the app with the real
docker-compose (`pydstack_guest.compose_cli`: the app's bridge network, its published ports
in this namespace, images pulled through the registry mirrors). Connections to a host port
are forwarded to that port inside (never to the agent's). Progress goes to ``events.log``
as the QEMU guest reports it (``booted`` → the boot's steps (``keys``, ``env``,
``gateway``, …) → ``agent`` → ``docker`` → ``app`` → ``ready``, or ``error`` and a halt;
``app-exited`` when a service's container ends, saying if the CVM's memory limit OOM-killed
it); SIGTERM is a graceful power-off. The KMS, gateway and registry mirrors it calls on the
host are relayed into the namespace (``_outbound``). It joins the CVM's cpu cgroup first, so
it, its dockerd and the containers share the CVM's vCPUs (``_cgroup``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from pydstack.adapters.cvm import SYS_CONFIG, CvmSpec
from pydstack.adapters.streams import pipe
from pydstack.core.portmap import port_map_error
from pydstack_guest.compose_app import start_compose_app
from pydstack_guest.compose_cli import ComposeFailed, ComposeProject

from . import _cgroup, _netns
from ._boot import AGENT_TCP, Network, boot
from ._docker import Docker, DockerError
from ._outbound import HostRelay

T0 = time.monotonic()


class SandboxRun(msgspec.Struct, frozen=True, kw_only=True):
    """How to run one sandbox CVM (``sandbox.json`` in its work dir, written by the backend)."""

    netns: str
    run_dir: str  # short path for sockets: docker.sock, dstack.sock, exec root
    images: str
    dev_pki: str = ""  # simulator PKI to sign quotes with (a KMS must trust it)
    dockerd: str = "dockerd"
    # The engine's registry mirrors (`up --registry`, `--registry-mirror`); relayed into the
    # namespace like the KMS. An image pinned by digest is checked against it whoever serves.
    registry_mirrors: tuple[str, ...] = ()


def emit(wd: Path, stage: str, detail: str = "") -> None:
    line = {"stage": stage, "detail": detail, "uptime_s": round(time.monotonic() - T0, 3)}
    with (wd / "events.log").open("ab") as f:
        f.write(json.dumps(line).encode() + b"\n")
    print(f"PYDSTACK_STAGE {json.dumps(line)}", flush=True)


def _bind(spec: CvmSpec) -> list[tuple[socket.socket, int]]:
    """Host-side listeners, bound before entering the CVM's namespace (they stay outside)."""
    out = []
    for p in spec.ports:
        if p.protocol != "tcp":
            print(f"port {p.protocol}/{p.host_port}: only tcp is forwarded", flush=True)
            continue
        bad = port_map_error(p, public_allowed=True)  # the VMM checked the host's setting
        if bad:
            print(f"port {p.protocol}/{p.host_port} not forwarded: {bad}", flush=True)
            continue
        family = socket.AF_INET6 if ":" in p.host_address else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((p.host_address, p.host_port))
        s.listen(128)
        s.setblocking(False)
        out.append((s, p.vm_port))
    return out


async def _forward(vm_port: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        r2, w2 = await asyncio.open_connection("127.0.0.1", vm_port)
    except OSError:
        w.close()
        return
    await asyncio.gather(pipe(r, w2), pipe(r2, w))
    for x in (w, w2):
        x.close()


def _forwarder(
    vm_port: int,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _forward(vm_port, r, w)

    return serve


def _pdeathsig() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the guest


def _dockerd(run: SandboxRun, wd: Path, rd: Path) -> subprocess.Popen[bytes]:
    """The CVM's engine, started once the boot has its keys (as dstack's docker.service
    follows dstack-prepare): containers it restarts by their policy never run before."""
    # Docker's default bridge and iptables: its NAT and port rules live in the CVM's own
    # namespace, so compose networks and published ports work there and nowhere else.
    argv = [run.dockerd, "--data-root", str(wd / "docker"), "--exec-root", str(rd / "x"),
            "--pidfile", str(rd / "dockerd.pid"), "--host", f"unix://{rd / 'docker.sock'}",
            "--cgroup-parent", f"/{run.netns}"]  # the CVM's memory limit (`_cgroup`)  # fmt: skip
    for mirror in run.registry_mirrors:
        argv += ["--registry-mirror", mirror]
    log = (wd / "dockerd.log").open("ab")
    return subprocess.Popen(argv, stdout=log, stderr=log, preexec_fn=_pdeathsig)


async def main(wd: Path) -> int:
    run = msgspec.json.decode((wd / "sandbox.json").read_bytes(), type=SandboxRun)
    run = msgspec.structs.replace(run, registry_mirrors=_mirror_urls(run, wd))
    spec = msgspec.json.decode((wd / "manifest.json").read_bytes(), type=CvmSpec)
    emit(wd, "booted", f"sandbox {run.netns}")
    rd = Path(run.run_dir)
    docker = Docker(rd / "docker.sock")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(docker.close)
        from pydstack_guest.boot import BootFailed

        for server in await RELAY[0].serve_inside() if RELAY else []:
            stack.callback(server.close)
        if RELAY:
            stack.callback(RELAY[0].close_udp)
        try:
            net = Network(rd, RELAY[0].udp) if RELAY else None
            booted = await boot(wd, run.dev_pki, spec, rd / "dstack.sock",
                                lambda stage, detail: emit(wd, stage, detail), net,
                                images=Path(run.images))  # fmt: skip
        except BootFailed as exc:
            # A failed boot halts (dstack #334): the VMM records VmBootError, no restart loop.
            emit(wd, "error", str(exc))
            await stop.wait()
            return 0
        stack.push_async_callback(booted.agent.aclose)
        emit(wd, "agent", str(rd / "dstack.sock"))
        dockerd = _dockerd(run, wd, rd)
        while not await docker.ping():
            if dockerd.poll() is not None:
                tail = (wd / "dockerd.log").read_text(errors="replace").strip().splitlines()[-1:]
                emit(wd, "error", f"dockerd exited with {dockerd.returncode}: {''.join(tail)}")
                return 1
            await asyncio.sleep(0.03)
        emit(wd, "docker")
        project = ComposeProject(workdir=wd / "compose", host_paths=False,
                                 docker_host=f"unix://{rd / 'docker.sock'}")  # fmt: skip
        try:
            logs = await start_compose_app(
                docker, spec.app_compose, booted.env, images=[(Path(run.images), spec.image)],
                dstack_sock=rd / "dstack.sock", tappd_sock=rd / "tappd.sock",
                console=wd / "console.log", compose=project,
                report=lambda stage, detail: emit(wd, stage, detail),
            )  # fmt: skip
        except (ComposeFailed, DockerError) as exc:  # halts as a failed boot does
            emit(wd, "error", f"boot error at app: {exc}")
            await stop.wait()
            await docker.stop_all(timeout_s=2)
            dockerd.terminate()
            return 0
        watch = [asyncio.create_task(_watch_exit(wd, docker, name, svc, spec.memory_mb))
                 for name, svc in (await docker.services()).items()]  # fmt: skip
        for s, vm_port in LISTENERS:
            server = await asyncio.start_server(_forwarder(vm_port), sock=s)
            stack.push_async_callback(server.wait_closed)
            stack.callback(server.close)
        emit(wd, "ready", ",".join(f"{s.getsockname()[1]}->{p}" for s, p in LISTENERS))
        while not stop.is_set():
            # asyncio.timeout: 3.11's wait_for can lose a cancel (see EventStore.read)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await stop.wait()
            if dockerd.poll() is not None:
                emit(wd, "error", f"dockerd exited with {dockerd.returncode}")
                return 1
        emit(wd, "shutdown")
        for t in watch:  # containers stopped by the power-off are no news
            t.cancel()
        await docker.stop_all(timeout_s=2)
        for t in logs:
            t.cancel()
    dockerd.terminate()
    try:
        await asyncio.to_thread(dockerd.wait, 10)
    except subprocess.TimeoutExpired:
        dockerd.kill()
    return 0


async def _watch_exit(wd: Path, docker: Docker, name: str, service: str, memory_mb: int) -> None:
    """Stage ``app-exited`` when a service's container ends by itself (the VMM records it as
    boot progress), saying so when the CVM's memory limit killed it."""
    code, oom = await docker.wait(name)
    detail = f"{service}: exit {code}"
    if oom:
        detail += f", OOM-killed (the CVM has {memory_mb} MB of memory)"
    emit(wd, "app-exited", detail)


def _halt() -> None:
    """Wait for the power-off, as a failed boot does (dstack #334: no restart loop)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    sys.exit(0)


LISTENERS: list[tuple[socket.socket, int]] = []
RELAY: list[HostRelay] = []  # the host services (KMS, gateway) relayed into the namespace


def _host_urls(wd: Path) -> list[str]:
    """The KMS and gateway URLs of sys-config (the services the boot calls on the host)."""
    try:
        doc = json.loads((wd / "shared" / SYS_CONFIG).read_text())
    except (OSError, ValueError):
        return []
    out: list[str] = []
    for key in ("kms_urls", "gateway_urls"):
        urls = doc.get(key) if isinstance(doc, dict) else None
        out += [str(u) for u in urls] if isinstance(urls, list) else []
    return out


def _mirror_urls(run: SandboxRun, wd: Path) -> tuple[str, ...]:
    """The engine's registry mirrors: the backend's, then sys-config's ``docker_registry``
    (dstack's one mirror, written by the host)."""
    try:
        doc = json.loads((wd / "shared" / SYS_CONFIG).read_text())
    except (OSError, ValueError):
        doc = {}
    extra = doc.get("docker_registry") if isinstance(doc, dict) else ""
    return tuple(dict.fromkeys([*run.registry_mirrors, *([str(extra)] if extra else [])]))


if __name__ == "__main__":
    workdir = Path(sys.argv[1]).resolve()
    cfg = msgspec.json.decode((workdir / "sandbox.json").read_bytes(), type=SandboxRun)
    manifest = msgspec.json.decode((workdir / "manifest.json").read_bytes(), type=CvmSpec)
    agent_port = int(AGENT_TCP.rpartition(":")[2])
    if any(p.vm_port == agent_port for p in manifest.ports):
        # The forwarder connects to the CVM's loopback, where the agent hands out app keys.
        emit(workdir, "error", f"port {agent_port} is the guest agent's (loopback only): "
                               "it cannot be forwarded to a host port")  # fmt: skip
        _halt()
    try:  # the VM's vCPUs: this process, its dockerd and all their children (`_cgroup`)
        _cgroup.ensure(cfg.netns, vcpu=manifest.vcpu, memory_mb=manifest.memory_mb)
        _cgroup.enter(cfg.netns)
    except OSError as exc:
        emit(workdir, "error", f"resource limits: {exc}")
        _halt()
    try:
        LISTENERS.extend(_bind(manifest))
    except OSError as exc:  # a host port taken by something outside pydstack
        emit(workdir, "error", f"cannot bind a host port: {exc}")
        sys.exit(1)
    mirrors = list(_mirror_urls(cfg, workdir))  # served inside as the KMS is
    RELAY.append(HostRelay.start([*_host_urls(workdir), *mirrors], cfg.run_dir))  # outside
    _netns.enter(cfg.netns)  # from here on, every new socket and child is inside the CVM
    _netns.kill_all(cfg.netns, exclude=os.getpid())  # leftovers of a run that was killed
    _cgroup.kill_all(cfg.netns, exclude=os.getpid())  # its containers (netns of their own)
    _netns.unmount_under(workdir / "docker", Path(cfg.run_dir))
    # Runtime state of an engine that was killed (its namespace was emptied above).
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    sys.exit(asyncio.run(main(workdir)))
