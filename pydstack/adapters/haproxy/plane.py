"""The HAProxy data plane: a child HAProxy whose maps follow the routing table live.

`HaproxyPlane.create` renders the config (see `config`), starts HAProxy on a listening
socket it binds itself and applies the table through the runtime API. `set_table` sends
only the differences (``add/set/del map``, ``set server addr``): no reload, the pid and
its connections stay. A background task re-picks apps' freshest instances as handshakes
age. Certificates are PEM files in a crt-list; `set_certificate` replaces or adds one
live (``set ssl cert`` / ``commit ssl cert`` / ``add ssl crt-list``).

Usage::

    plane = await HaproxyPlane.create(HaproxyConfig(port=443), {"app.example.com": (chain, key)})
    async with plane:
        await plane.set_table(table)
        print(await plane.stats())
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import shutil
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pydstack.adapters.secretfile import write_secret
from pydstack.core.gateway import RoutingTable

from .config import MAPS, REFUSALS, HaproxyConfig, RunPaths, render_config
from .maps import PlaneState, desired_state, diff_commands
from .process import HaproxyProcess
from .runtime import HaproxyError, RuntimeApi

_DATA_BACKENDS = ("be_pass", "be_direct")
log = structlog.get_logger("pydstack.haproxy")


@dataclass
class PlaneStats:
    """Counters read from ``show stat``; reasons as the built-in proxy names them."""

    routed: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)


def _placeholder_pem() -> bytes:
    """A throw-away self-signed certificate: a crt-list may not be empty. ``strict-sni``
    keeps it from ever being served (its name matches no SNI)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "placeholder.invalid")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM) + key_pem


def _write_private(path: Path, data: bytes) -> None:
    write_secret(path, data)  # a PEM with its key: 0600, replaced whole (haproxy may read it)


def _bind(cfg: HaproxyConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg.host, cfg.port))
        sock.listen(4096)
    except OSError:
        sock.close()
        raise
    return sock


class HaproxyPlane:
    """The plane; build with `create`, run with ``async with`` (or `aclose`)."""

    def __init__(
        self,
        config: HaproxyConfig,
        paths: RunPaths,
        listener: socket.socket,
        process: HaproxyProcess,
        owns_dir: bool,
    ) -> None:
        self.config, self.paths = config, paths
        self.api = RuntimeApi(paths.admin)
        self.process = process
        self._listener = listener
        self._owns_dir = owns_dir
        self._state = PlaneState()
        self._table = RoutingTable()
        self._custom: dict[str, tuple[str, int]] = {}
        self._lock = asyncio.Lock()
        self._refresher: asyncio.Task[None] | None = None

    @classmethod
    async def create(
        cls,
        config: HaproxyConfig,
        certs: Mapping[str, tuple[bytes, bytes]] | None = None,
        table: RoutingTable | None = None,
        *,
        custom_domains: Mapping[str, tuple[str, int]] | None = None,
        run_dir: Path | None = None,
    ) -> HaproxyPlane:
        """Start HAProxy with ``certs`` (base domain -> chain PEM, key PEM) and ``table``."""
        owns = run_dir is None
        root = Path(tempfile.mkdtemp(prefix="pdhap-")) if run_dir is None else run_dir
        paths = RunPaths.under(root)
        paths.certs.mkdir(parents=True, exist_ok=True)
        listener = None
        try:
            _write_private(paths.certs / "0-placeholder.pem", _placeholder_pem())
            for domain, (chain, key) in (certs or {}).items():
                _write_private(cls._cert_path(paths, domain), chain.rstrip() + b"\n" + key)
            paths.crt_list.write_text("".join(f"{p}\n" for p in sorted(paths.certs.glob("*.pem"))))
            for name in MAPS:
                paths.map(name).write_text("")
            listener = _bind(config)
            paths.config.write_text(render_config(config, paths, listen_fd=listener.fileno()))
            process = await HaproxyProcess.start(
                paths, binary=config.binary, pass_fds=(listener.fileno(),)
            )
        except BaseException:
            if listener is not None:
                listener.close()
            if owns:
                shutil.rmtree(root, ignore_errors=True)
            raise
        self = cls(config, paths, listener, process, owns)
        try:
            await self.set_table(table or RoutingTable(), custom_domains=custom_domains)
        except BaseException:
            await self.aclose()
            raise
        return self

    @staticmethod
    def _cert_path(paths: RunPaths, domain: str) -> Path:
        domain = domain.lower().rstrip(".")
        if not domain or "/" in domain or domain.startswith("."):
            raise ValueError(f"base domain {domain!r} cannot name a certificate file")
        return paths.certs / f"{domain}.pem"

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def table(self) -> RoutingTable:
        return self._table

    async def set_table(
        self,
        table: RoutingTable,
        *,
        custom_domains: Mapping[str, tuple[str, int]] | None = None,
        now: float | None = None,
    ) -> int:
        """Apply ``table`` (and custom domains, when given) live; returns commands sent."""
        async with self._lock:
            if custom_domains is not None:
                self._custom = dict(custom_domains)
            new = desired_state(
                table,
                time.time() if now is None else now,
                handshake_stale=self.config.handshake_stale,
                custom_domains=self._custom,
                slots_before=self._state.slots,
                pp_slots=self.config.pp_slots,
            )
            commands = diff_commands(self.paths, self._state, new)
            if commands:
                await self.api.apply(commands)
            self._state, self._table = new, table
            return len(commands)

    async def set_app_limit(self, limit: int) -> None:
        """Concurrent connections allowed per app from now on (0: unlimited)."""
        await self.api.apply([f"experimental-mode on; set var proc.app_limit int({int(limit)})"])

    async def set_certificate(self, base_domain: str, chain_pem: bytes, key_pem: bytes) -> None:
        """Serve a new certificate for ``base_domain`` (added or replaced), without a reload."""
        path = self._cert_path(self.paths, base_domain)
        pem = (chain_pem.rstrip() + b"\n" + key_pem).decode().strip()
        is_new = not path.exists()
        _write_private(path, pem.encode() + b"\n")  # what a restart would load
        steps = ([f"new ssl cert {path}"] if is_new else []) + [
            f"set ssl cert {path} <<\n{pem}\n",
            f"commit ssl cert {path}",
        ]
        if is_new:
            steps.append(f"add ssl crt-list {self.paths.crt_list} {path}")
        for step in steps:  # one connection each: payload commands end with an empty line
            answer = await self._raw(step)
            if not any(ok in answer for ok in ("New empty", "Transaction", "Success", "Inserting")):
                raise HaproxyError(f"{step.splitlines()[0]!r}: {answer.strip()}")

    async def _raw(self, command: str) -> str:
        async with asyncio.timeout(self.api.timeout):
            reader, writer = await asyncio.open_unix_connection(str(self.paths.admin))
            try:
                writer.write(command.encode() + b"\n")
                await writer.drain()
                return (await reader.read()).decode(errors="replace")
            finally:
                writer.close()

    async def stats(self) -> PlaneStats:
        """Routed connections by mode and refusals by reason, from HAProxy's counters."""
        rows = {(r["pxname"], r["svname"]): r for r in await self.api.stat()}

        def total(px: str, column: str = "stot", sv: str = "BACKEND") -> int:
            value = rows.get((px, sv), {}).get(column, "")
            return int(value) if value.isdigit() else 0

        out = PlaneStats()
        for reason in REFUSALS:
            out.refused[reason] = total(f"rf_{reason}")
        data = [*_DATA_BACKENDS, *(px for px, sv in rows if px.startswith("pp") and sv == "s")]
        out.refused["connect_failed"] = sum(total(px, "econ") for px in data)
        out.routed["terminate"] = total("be_to_term")
        out.routed["h2"] = total("be_to_h2")
        refused = sum(out.refused[r] for r in REFUSALS)
        out.routed["passthrough"] = (
            total("fe_main", sv="FRONTEND") - refused - out.routed["terminate"] - out.routed["h2"]
        )
        return out

    async def active_by_app(self) -> dict[str, int]:
        """Concurrent connections per app (the stick table behind the per-app limit)."""
        entries = await self.api.table("st_app")
        counts = {k: int(v.get("conn_cur", "0")) for k, v in entries.items()}
        return {k: n for k, n in counts.items() if n}

    async def __aenter__(self) -> Self:
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval)
            try:
                await self.set_table(self._table)
            except Exception as exc:  # keep refreshing: HAProxy may come back, slots free up
                log.warning("refresh failed", error=str(exc), pid=self.process.pid)

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        await self.process.stop()
        self._listener.close()
        if self._owns_dir:
            shutil.rmtree(self.paths.root, ignore_errors=True)
