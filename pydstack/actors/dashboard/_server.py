"""The dashboard server: follower task + aiohttp site, owned by one object.

Usage::

    cfg = DashboardConfig(port=8080, dev_env_key=data_dir / "dashboard" / "dev-env.key")
    async with await Dashboard.create(operator_store, cfg) as dash:
        print(dash.url)                  # http://127.0.0.1:8080/
        await dash.follower.ready.wait() # the views have caught up with the log

The store's identity signs every command the dashboard appends (``operator`` under
``pydstack up``). It answers only requests naming one of its own Hosts, and writes only from
its own page (CSRF token) or with the login token (``_guard``). It listens on 127.0.0.1 by
default: the deploy form's WebCrypto X25519 needs a secure context, which plain http has only
on loopback. Bound elsewhere (``host``), every request needs the login token
(``login_token_file``; ``dash.login_token``).
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog
from aiohttp import web

from pydstack.adapters.nats import EventStore

from ._api import create_app
from ._envkey import DevEnvKey, EnvKeySource, KmsEnvKey
from ._follower import Follower, Hub
from ._guard import Guard, load_or_create_token
from ._services import Services
from ._state import EVENT_WINDOW, LiveState

_log = structlog.get_logger("pydstack.dashboard")


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    port: int = 8080  # taken: any free port (logged); 0: any free port
    host: str = "127.0.0.1"
    kms_url: str = ""  # set: env keys come from this KMS (GetAppEnvEncryptPubKey)
    kms_ca_pem: str | None = None  # [default: the cluster's KMS CA on the log]
    kms_cluster: str = "main"  # only this KMS cluster's root may sign an env key
    kms_dev_pki: Path | None = None  # no CA to pin: check the KMS's RA-TLS under it (simulated)
    dev_env_key: Path | None = None  # without a KMS: the dev env key file (None: in memory)
    event_window: int = EVENT_WINDOW  # recent events kept in memory (older: read from NATS)
    # Further names browsers may reach it by (Host header: NAME or NAME:PORT), e.g. a reverse
    # proxy's; the bind address and, on loopback or wildcard binds, localhost are always in.
    allowed_hosts: tuple[str, ...] = ()
    # The login token (made 0600 the first time); None: a fresh one for this process only.
    # Required on every request unless ``host`` is loopback; always good for writes.
    login_token_file: Path | None = None
    # Tenants' logins: <NAME>.token here logs in as tenant NAME, whose seed (NAME.nk in
    # identities_dir) signs its writes (`pydstack tenant add NAME --dashboard`).
    tenants_dir: Path | None = None
    identities_dir: Path | None = None


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``port``, or on a free port when that one is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for candidate in (port, 0) if port else (0,):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or candidate == 0:
                raise
            _log.info("dashboard port taken; using a free one", port=port)
            continue
        sock.listen(128)
        sock.setblocking(False)
        return sock
    raise AssertionError("unreachable")


def _url_host(bind: str) -> str:
    """Where to reach a socket bound to ``bind`` (a wildcard bind: over loopback)."""
    if bind in ("0.0.0.0", ""):
        return "127.0.0.1"
    if ":" in bind:
        return "[::1]" if bind.strip("[]") == "::" else f"[{bind.strip('[]')}]"
    return bind


class Dashboard:
    """Owns the follower task, the hub and the HTTP site; ``close`` stops all three."""

    def __init__(self, store: EventStore, config: DashboardConfig) -> None:
        self.store = store
        self.config = config
        self.state = LiveState(config.event_window)
        self.hub = Hub()
        self.follower = Follower(store, self.state, self.hub)
        self.env_key = self._env_key_source()
        self.url = ""
        self.guard: Guard | None = None  # set once bound (the allowlist names the real port)
        self._runner: web.AppRunner | None = None

    def _env_key_source(self) -> EnvKeySource:
        c = self.config
        if c.kms_url:
            from pydstack.adapters.tdx.pki import DevPki

            return KmsEnvKey(
                c.kms_url, cluster=c.kms_cluster, root=lambda: self.state.kms_root(c.kms_cluster),
                ca_pem=c.kms_ca_pem, dev_pki=DevPki.load(c.kms_dev_pki) if c.kms_dev_pki else None,
            )  # fmt: skip
        if c.dev_env_key is None:  # nowhere to keep it: a key for this process only
            return DevEnvKey(os.urandom(32))
        return DevEnvKey.load_or_create(c.dev_env_key)

    @property
    def login_token(self) -> str:
        assert self.guard is not None, "not started"
        return self.guard.login_token

    @property
    def csrf_token(self) -> str:
        assert self.guard is not None, "not started"
        return self.guard.csrf_token

    @classmethod
    async def create(cls, store: EventStore, config: DashboardConfig) -> Dashboard:
        dash = cls(store, config)
        await dash._start()
        return dash

    async def _start(self) -> None:
        c = self.config
        token = load_or_create_token(c.login_token_file) if c.login_token_file else ""
        await self.follower.__aenter__()
        try:
            services = Services(self.state, self.hub, self.store, self.env_key,
                                self.follower.ready, c.identities_dir,
                                simulated=c.kms_dev_pki is not None)  # fmt: skip
            sock = _bind(c.host, c.port)
            port = sock.getsockname()[1]
            try:
                self.guard = Guard.create(c.host, port, c.allowed_hosts, login_token=token,
                                          tenants_dir=c.tenants_dir)  # fmt: skip
                # shutdown_timeout: open event streams end at once (the hub closes them first)
                self._runner = web.AppRunner(create_app(services, self.guard), access_log=None,
                                             shutdown_timeout=2.0)  # fmt: skip
                await self._runner.setup()
            except BaseException:
                sock.close()
                raise
            await web.SockSite(self._runner, sock).start()
            self.url = f"http://{_url_host(c.host)}:{port}/"
        except BaseException:
            await self.close()
            raise
        _log.info("dashboard listening", url=self.url, login=self.guard.login_required,
                  env_key="kms" if c.kms_url else "dev")  # fmt: skip

    async def close(self) -> None:
        self.hub.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.follower.__aexit__(None, None, None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
