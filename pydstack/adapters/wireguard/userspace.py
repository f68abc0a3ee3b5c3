"""Userspace backend: one `wireguard-go -f <ifname>` per device, configured over UAPI.

wireguard-go always puts its UAPI socket at ``/var/run/wireguard/<ifname>.sock``, a path
shared by every network namespace, so two daemons named ``wg0`` collide. Each daemon
therefore runs in a private mount namespace where a per-device directory of ours is
bind-mounted on ``/var/run/wireguard``: the socket appears in that directory on the host,
and every namespace can use the same interface name.

Usage::

    backend = UserspaceBackend(run_dir=Path("/run/pydstack/wg"))
    async with await backend.create("wg0", netns="gw1") as dev:
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path

from . import netns as _ns
from .device import WireGuardBackend, WireGuardDevice
from .errors import BackendUnavailable, DeviceError, UapiProtocolError
from .keys import PrivateKey
from .model import DeviceStatus, PeerOp
from .uapi import GET_REQUEST, check_set_response, parse_get, render_set

_LAUNCH = 'mkdir -p /var/run/wireguard && mount --bind "$1" /var/run/wireguard && exec "$2" -f "$3"'
_SOCK_MAX = 107  # sun_path limit, minus the NUL


async def uapi_request(socket_path: str, request: bytes, *, timeout: float = 5.0) -> bytes:
    """Send one UAPI request on a fresh connection and return the answer up to its blank line."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(socket_path)
            try:
                writer.write(request)
                await writer.drain()
                answer = b""
                while not (b"errno=" in answer and answer.endswith(b"\n\n")):
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise UapiProtocolError(
                            f"UAPI socket {socket_path} closed mid-answer after {len(answer)} bytes"
                        )
                    answer += chunk
                return answer
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError as exc:
        raise DeviceError(f"UAPI socket {socket_path} did not answer within {timeout}s") from exc
    except OSError as exc:
        raise DeviceError(f"UAPI socket {socket_path}: {exc}; is wireguard-go running?") from exc


class UserspaceDevice(WireGuardDevice):
    """A device carried by a wireguard-go child process."""

    def __init__(
        self,
        ifname: str,
        netns: str | None,
        proc: asyncio.subprocess.Process,
        sock_dir: Path,
        log_path: Path,
    ) -> None:
        super().__init__(ifname, netns)
        self._proc = proc
        self._sock_dir = sock_dir
        self.log_path = log_path
        self.socket_path = str(sock_dir / f"{ifname}.sock")

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def status(self) -> DeviceStatus:
        return parse_get(await uapi_request(self.socket_path, GET_REQUEST))

    async def _set(
        self,
        ops: Sequence[PeerOp],
        *,
        private_key: PrivateKey | None = None,
        listen_port: int | None = None,
        fwmark: int | None = None,
    ) -> None:
        request = render_set(ops, private_key=private_key, listen_port=listen_port, fwmark=fwmark)
        check_set_response(await uapi_request(self.socket_path, request))

    async def carrier_lost(self) -> str:
        code = await self._proc.wait()
        return f"wireguard-go for {self.ifname} exited with code {code}"

    async def close(self) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(5):
                    await self._proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
                await self._proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
        with contextlib.suppress(OSError):
            self._sock_dir.rmdir()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


class UserspaceBackend(WireGuardBackend):
    """Runs wireguard-go (Debian package `wireguard-go`) inside the target namespace."""

    name = "userspace"

    def __init__(self, run_dir: Path, *, binary: str = "wireguard-go") -> None:
        self.run_dir = run_dir
        self.binary = binary

    async def unavailable_reason(self) -> str | None:
        if shutil.which(self.binary) is None:
            return f"{self.binary} not found on PATH (Debian package wireguard-go)"
        for tool in ("nsenter", "unshare", "mount"):
            if shutil.which(tool) is None:
                return f"{tool} not found on PATH (util-linux)"
        if os.geteuid() != 0:
            return "the userspace backend needs root (TUN devices, namespaces, mounts)"
        return None

    def _sock_dir(self, ifname: str, netns: str | None) -> Path:
        # Short, unique per (netns, ifname): socket paths must fit in sun_path.
        tag = hashlib.sha256(f"{netns}/{ifname}".encode()).hexdigest()[:12]
        path = self.run_dir / tag
        if len(str(path / f"{ifname}.sock")) > _SOCK_MAX:
            raise DeviceError(f"run_dir {self.run_dir} is too long for a unix socket path")
        return path

    async def create(self, ifname: str, netns: str | None = None) -> UserspaceDevice:
        if not 0 < len(ifname) <= 15 or "/" in ifname or ifname.startswith("-"):
            raise DeviceError(f"interface name {ifname!r}: 1-15 characters, no '/', no leading '-'")
        binary = shutil.which(self.binary)
        if binary is None:
            raise BackendUnavailable(f"{self.binary} not found on PATH")
        if await _ns.link_exists(netns, ifname):
            raise DeviceError(f"interface {ifname} already exists in netns {netns or '<host>'}")
        sock_dir = self._sock_dir(ifname, netns)
        sock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_path = sock_dir.with_suffix(".log")
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            _LAUNCH,
            "sh",
            str(sock_dir),
            binary,
            ifname,
        ]
        if netns is not None:
            argv = ["nsenter", f"--net={_ns.netns_path(netns)}", "--", *argv]
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "LOG_LEVEL": "error"},
            )
        finally:
            os.close(log)
        device = UserspaceDevice(ifname, netns, proc, sock_dir, log_path)
        try:
            await self._wait_ready(device, proc)
        except BaseException:
            await device.close()
            raise
        return device

    async def _wait_ready(self, device: UserspaceDevice, proc: asyncio.subprocess.Process) -> None:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns when the device gets
        # ready as a cancel arrives, losing the cancel.
        try:
            async with asyncio.timeout(10):
                await self._poll_ready(device, proc)
        except TimeoutError as exc:
            raise DeviceError(
                f"wireguard-go for {device.ifname} did not open {device.socket_path} in 10s"
            ) from exc

    @staticmethod
    async def _poll_ready(device: UserspaceDevice, proc: asyncio.subprocess.Process) -> None:
        delay = 0.005
        while True:
            if proc.returncode is not None:
                tail = device.log_path.read_text(errors="replace")[-500:]
                raise DeviceError(
                    f"wireguard-go for {device.ifname} exited with {proc.returncode}: {tail}"
                )
            try:
                await device.status()  # fails with DeviceError until the socket is there
                return
            except DeviceError:
                pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
