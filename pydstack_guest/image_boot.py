"""The QEMU guest image's boot flow: ``python3 -m pydstack_guest.image_boot``.

Started by the image's ``guest-boot.py`` once the host share is mounted and eth0 has an
address, when the app-compose has a compose file; each stage goes to stdout as a JSON line
``{"stage", "detail"}`` that guest-boot.py reports to the host (virtio-serial events port and
serial console). The flow is the sandbox's (`pydstack_guest.td_boot.boot_td`, then
`pydstack_guest.compose_app`) on the system's docker engine, plus the LUKS2 data disk
(`pydstack_guest.data_disk`: formatted with the app's disk key on first boot, opened after,
mounted at /dstack/persistent with docker's state on it; ``storage-fs`` = ``ext4``). The
engine starts once the "storage" stage is reported (guest-boot.py holds its READY until then).

The TD is the guest kernel's when it has configfs-tsm (real TDX quotes), else simulated only
on a VM whose platform has no TEE (``tcg``, ``kvm``), with the dev PKI the KMS trusts
(``dev-pki/``), ``dev-td.json`` (the image's measured parts, the sandbox images to import)
and those images (``images/<name>/``) that the QEMU backend writes only for such VMs; a TDX VM
without configfs-tsm stops at ``tee`` (`pydstack_guest.tee`). The ``tee`` stage says which.

Networking is QEMU user mode (slirp), where the host's loopback is 10.0.2.2. The KMS and
gateway URLs of sys-config that name the host's loopback (``https://127.0.0.1:9100``) stay as
they are (their certificates name that address): a relay in the guest listens on the same
address and port and connects to 10.0.2.2. A gateway's WireGuard endpoint on the host's
loopback is dialled at 10.0.2.2 instead (UDP, no names to keep). URLs naming another address
are reached directly through slirp's NAT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from pydstack.adapters.sandbox._docker import Docker
from pydstack.adapters.sandbox._outbound import LOOPBACK, relay_targets, split_endpoint
from pydstack.adapters.streams import pipe

from .boot import BootFailed, HostShared, read_host_shared
from .tee import DEV_TD_FILE, TeePaths, open_td

SHARE = Path("/dstack/.host-shared")
HOST_ALIAS = "10.0.2.2"  # slirp: the host's loopback as the guest sees it
STATE = Path("/run/pydstack")
DSTACK_SOCK = Path("/var/run/dstack.sock")
DSTACK_SOCK_ALIASES = (Path("/var/run/dstack/dstack.sock"),)  # dstack's agent config names it
TAPPD_SOCK = Path("/var/run/tappd.sock")
RUNTIME_LOG = Path("/run/log/dstack/runtime_events.log")
DOCKER_SOCK = Path("/var/run/docker.sock")
AGENT_TCP = "127.0.0.1:8090"  # as in the sandbox: the agent's API on the guest's loopback
CONSOLE = Path("/dev/ttyS0")  # the apps' output joins the serial console (serial.log)
DOCKER_CONFIG = Path("/etc/docker/daemon.json")  # read by docker.service, which starts later
MAX_URL = 512


def registry_mirror(sysc: dict[str, object]) -> str:
    """sys-config's ``docker_registry`` (dstack's mirror, named by the untrusted host) once
    checked: an http(s) URL with a host and nothing else, or "" when none is named. A mirror
    can only serve what a digest in the measured compose accepts; a tag it can swap, as any
    registry on the host's network path could."""
    url = sysc.get("docker_registry")
    if url in (None, ""):
        return ""
    parts = urlsplit(url) if isinstance(url, str) and len(url) <= MAX_URL else None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or parts.username or parts.password or parts.query or parts.fragment
            or any(c.isspace() or ord(c) < 0x20 for c in str(url))):  # fmt: skip
        raise BootFailed("host-shared", "sys-config docker_registry is not a plain http(s) URL")
    return str(url)


def write_docker_config(mirror: str, path: Path = DOCKER_CONFIG) -> None:
    """The guest engine's registry mirror, before docker.service starts (after "storage")."""
    if not mirror:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"registry-mirrors": [mirror]}) + "\n")


def report(stage: str, detail: str = "") -> None:
    print(json.dumps({"stage": stage, "detail": detail}), flush=True)


async def relay_host_services(urls: list[str]) -> list[asyncio.Server]:
    """A listener on each loopback (address, port) of `urls`, relaying to the host's."""
    servers = []
    for host, port in relay_targets(urls):
        if host not in LOOPBACK:
            continue  # another machine: slirp's NAT reaches it as it is

        async def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter, port: int = port) -> None:
            try:
                r2, w2 = await asyncio.open_connection(HOST_ALIAS, port)
            except OSError:
                w.close()
                return
            await asyncio.gather(pipe(r, w2), pipe(r2, w))
            for x in (w, w2):
                x.close()

        servers.append(await asyncio.start_server(relay, host, port))
    return servers


async def reach(endpoint: str) -> str:
    """A gateway's WireGuard endpoint as the guest dials it."""
    host, port = split_endpoint(endpoint)
    return f"{HOST_ALIAS}:{port}" if host in LOOPBACK else endpoint


def _vm_size(shared: HostShared) -> tuple[int, int]:
    """(vCPUs, MiB) from sys-config's vm_config, else what this kernel sees."""
    try:
        doc = json.loads(json.loads(shared.sys_config).get("vm_config") or "{}")
    except (ValueError, AttributeError):
        doc = {}
    mem = int(doc.get("memory_size") or 0) >> 20
    if not mem:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) >> 10
    return int(doc.get("cpu_count") or os.cpu_count() or 1), mem


def sandbox_images(share: Path) -> list[tuple[Path, str]]:
    """The sandbox images (busybox...) a simulated TD's docker imports: dev-td.json's list."""
    try:
        names = json.loads((share / DEV_TD_FILE).read_text()).get("images", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [(share / "images", str(n)) for n in names]


async def _wait_docker(docker: Docker, timeout_s: float = 300.0) -> None:
    for _ in range(int(timeout_s * 2)):  # nothing to wait on but the socket itself
        if await docker.ping():
            return
        await asyncio.sleep(0.5)
    raise TimeoutError


async def run(stop: asyncio.Event, *, share: Path = SHARE, tee: TeePaths | None = None) -> None:
    from pydstack.adapters.wireguard import UserspaceBackend

    from .compose_app import start_compose_app
    from .data_disk import load_dm_crypt, setup_data_disk
    from .td_boot import boot_td

    shared = read_host_shared(share)
    sysc = json.loads(shared.sys_config)
    vcpu, mem = _vm_size(shared)
    name = json.loads(shared.app_compose).get("name") or "app"
    # First: nothing reaches the KMS, the gateway or docker before the TEE is settled.
    td = await asyncio.to_thread(open_td, share, shared, state_dir=STATE, name=name, vcpu=vcpu,
                                 memory_mb=mem, paths=tee)  # fmt: skip
    mirror = registry_mirror(sysc)
    write_docker_config(mirror)
    async with contextlib.AsyncExitStack() as stack:
        for server in await relay_host_services(
            [
                *sysc.get("kms_urls", []),
                *sysc.get("gateway_urls", []),
                *([mirror] if mirror else []),
            ]
        ):
            stack.callback(server.close)
        await asyncio.to_thread(subprocess.run, ["modprobe", "tun"], capture_output=True)
        app_id = str(json.loads(shared.instance_info or b"{}").get("app_id") or "")

        async def data_disk(key: bytes) -> str:
            return await setup_data_disk(key, label=app_id)

        # The LUKS2 data disk, where the kernel has dm-crypt (its modules are in the image);
        # docker.service waits for the "storage" stage (guest-boot.py): its state is on it.
        booted = await boot_td(
            shared, td, sock=DSTACK_SOCK, report=report, wg=UserspaceBackend(STATE / "wg"),
            reach=reach, agent_tcp=AGENT_TCP, dm_crypt=await load_dm_crypt(),
            data_disk=data_disk, tappd_sock=TAPPD_SOCK, dstack_aliases=DSTACK_SOCK_ALIASES,
            runtime_log=RUNTIME_LOG, socket_mode=0o777,  # dstack's socket units: SocketMode=0777
        )  # fmt: skip
        stack.push_async_callback(booted.agent.aclose)
        report("agent", str(DSTACK_SOCK))
        docker = Docker(DOCKER_SOCK)
        stack.push_async_callback(docker.close)
        try:
            await _wait_docker(docker)
        except TimeoutError:
            raise BootFailed("docker", f"{DOCKER_SOCK} did not answer in 300 s") from None
        report("docker")
        images = sandbox_images(share) if td.kind == "simulated" else []
        try:
            logs = await start_compose_app(docker, shared.app_compose, booted.env,
                                           images=images, dstack_sock=DSTACK_SOCK,
                                           tappd_sock=TAPPD_SOCK,
                                           console=CONSOLE, report=report)  # fmt: skip
        except Exception as e:
            raise BootFailed("app", f"{type(e).__name__}: {e}") from None
        report("ready", f"{len(logs)} service(s)")
        await stop.wait()
        report("shutdown")
        await docker.stop_all(timeout_s=2)
        for t in logs:
            t.cancel()


async def main() -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await run(stop)
    except BootFailed as e:
        # A failed boot halts (dstack #334): the host records the error, nothing restarts.
        report("error", str(e))
        await stop.wait()
    except Exception as e:
        report("error", f"boot error: {type(e).__name__}: {e}")
        await stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
