"""The built-in data plane: an asyncio TLS proxy routing by SNI with dstack's rules.

Per connection: peek the ClientHello (``MSG_PEEK``, so the bytes stay in the kernel for
whoever reads them next), route its server name, pick backends from the current routing
table, then either relay the TLS bytes untouched (``s``) or terminate TLS with the base
domain's certificate (``g``: ALPN h2) and relay plaintext. Backends are dialled
concurrently and the first to connect wins. Anything wrong closes that one connection.
dstack's reserved ids ``health`` and ``gateway`` are answered by the proxy itself
(``reserved.py``).

Two caps keep one client from exhausting the host's file descriptors (each relayed
connection holds two): ``max_connections_per_app`` (refused once routed, ``app_limit``) and
``max_connections`` over all apps together, checked at accept: a connection over it is reset
at once, before a byte is read (``global_limit``), and logged at most once per
``limit_log_interval`` with the number refused since the last line.

Usage::

    proxy = await ProxyServer.create(ProxyConfig(port=8443), certs, table)
    async with proxy:
        proxy.set_table(new_table)      # atomic: later connections see the new table
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import structlog

from pydstack.core.gateway import (
    Backend,
    ClientHello,
    IncompleteClientHello,
    MalformedClientHello,
    Mode,
    Refusal,
    Route,
    RouteError,
    RoutingTable,
    Selection,
    encode_proxy_header,
    parse_client_hello,
    parse_route,
    pick_backends,
)

from .certs import CertProvider
from .relay import Half, Link
from .reserved import PORT as RESERVED_PORT
from .reserved import RESERVED, serve_reserved

log = structlog.get_logger("pydstack.proxy")

# A custom domain's app address (dstack: DNS TXT `_dstack-app-address`): (app_id, port).
AppAddressResolver = Callable[[str], Awaitable[tuple[str, int] | None]]


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Listen address and dstack's proxy knobs (defaults from dstack's gateway.toml)."""

    host: str = "127.0.0.1"
    port: int = 8443  # 0: pick a free port (see ProxyServer.port)
    top_n: int = 3
    handshake_stale: float = 1800.0
    connect_timeout: float = 5.0
    handshake_timeout: float = 5.0  # SNI peek and TLS handshake, each
    idle_timeout: float | None = 600.0
    total_timeout: float | None = 5 * 3600.0
    max_connections_per_app: int = 2000  # 0: unlimited
    max_connections: int = 10_000  # open connections over all apps together; 0: unlimited
    limit_log_interval: float = 10.0  # seconds between two "limit reached" log lines
    max_client_hello: int = 16384
    half_close: bool | None = None  # None: on, except under uvloop (see relay.py)
    backlog: int = 4096


@dataclass
class ProxyStats:
    """Counters tests and metrics read: accepted, routed by mode, refused by reason, open."""

    accepted: int = 0
    active: int = 0  # connections open now (accepted, not yet closed), all apps together
    routed: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    active_by_app: Counter[str] = field(default_factory=Counter)


class Refused(Exception):
    """Internal: this connection is refused for ``reason``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _discard_unread(sock: socket.socket) -> None:
    """Read what was only peeked, so closing sends a FIN rather than a reset."""
    with contextlib.suppress(OSError):
        for _ in range(4):
            if not sock.recv(65536):
                return


def _is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("uvloop")


class ProxyServer:
    """The proxy; build with `create`, run with ``async with``."""

    def __init__(
        self,
        config: ProxyConfig,
        certs: CertProvider,
        table: RoutingTable,
        listener: socket.socket,
        resolve_app_address: AppAddressResolver | None,
    ) -> None:
        self.config = config
        self.certs = certs
        self.table = table
        self.stats = ProxyStats()
        self._listener = listener
        self._resolve = resolve_app_address
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving = False
        self._over_limit = 0  # refused at accept since the last "limit reached" line
        self._limit_logged = -float("inf")
        self._half_close = (
            config.half_close if config.half_close is not None else not _is_uvloop(self._loop)
        )

    @classmethod
    async def create(
        cls,
        config: ProxyConfig,
        certs: CertProvider,
        table: RoutingTable | None = None,
        *,
        resolve_app_address: AppAddressResolver | None = None,
    ) -> ProxyServer:
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((config.host, config.port))
            listener.listen(config.backlog)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        return cls(config, certs, table or RoutingTable(), listener, resolve_app_address)

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def set_table(self, table: RoutingTable) -> None:
        """Swap the routing table; connections already routed keep their backends."""
        self.table = table

    async def __aenter__(self) -> Self:
        self._serving = True
        self._loop.add_reader(self._listener.fileno(), self._accept_ready)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._serving:
            self._serving = False
            self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept_ready(self) -> None:
        for _ in range(64):  # bounded batch: keep the loop fair under a SYN flood
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: log, keep serving
                log.warning("accept failed", error=str(exc))
                return
            self.stats.accepted += 1
            limit = self.config.max_connections
            if limit and self.stats.active >= limit:
                self._refuse_over_limit(sock)
                continue
            sock.setblocking(False)  # TCP_NODELAY: set by the loop's transport
            self.stats.active += 1
            task = self._loop.create_task(self._serve(sock))
            self._tasks.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.stats.active -= 1

    def _refuse_over_limit(self, sock: socket.socket) -> None:
        """Over ``max_connections``: reset at once (no task, no timer, no TIME_WAIT kept)."""
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        self.stats.refused["global_limit"] += 1
        self._over_limit += 1
        now = time.monotonic()
        if now - self._limit_logged >= self.config.limit_log_interval:
            log.warning("connection limit reached, refusing new connections",
                        limit=self.config.max_connections, active=self.stats.active,
                        refused=self._over_limit)  # fmt: skip
            self._limit_logged, self._over_limit = now, 0

    async def _serve(self, sock: socket.socket) -> None:
        try:
            await self._route_and_relay(sock)
        except Refused as r:
            self.stats.refused[r.reason] += 1
            log.debug("connection refused", reason=r.reason, detail=r.detail)
            _discard_unread(sock)
        except Exception as exc:  # a bug must cost one connection, not the proxy
            self.stats.refused["internal_error"] += 1
            log.exception("connection failed", error=repr(exc))
        finally:
            sock.close()  # no-op once a transport owns and has closed it

    def _try_hello(self, sock: socket.socket, seen: int) -> ClientHello | int:
        """The ClientHello peeked so far, or how many bytes are there (-1: none yet)."""
        limit = self.config.max_client_hello
        try:
            data = sock.recv(limit, socket.MSG_PEEK)
        except BlockingIOError:
            return -1
        except OSError as exc:
            raise Refused("client_error", str(exc)) from exc
        if not data:
            raise Refused("client_eof", f"closed after {seen} bytes")
        try:
            return parse_client_hello(data)
        except IncompleteClientHello:
            if len(data) >= limit:
                raise Refused("malformed_client_hello", f"over {limit} bytes") from None
        except MalformedClientHello as exc:
            raise Refused("malformed_client_hello", str(exc)) from exc
        return len(data)

    async def _peek_hello(self, sock: socket.socket) -> ClientHello:
        """Wait for a complete ClientHello (when it was not there at accept)."""
        delay, seen = 0.001, 0
        while True:
            await self._readable(sock)
            got = self._try_hello(sock, seen)
            if isinstance(got, ClientHello):
                return got
            if got < 0:
                continue
            if got == seen:  # peeked data keeps the socket readable: back off instead
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
            seen = got

    async def _readable(self, sock: socket.socket) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        fd = sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self._loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            self._loop.remove_reader(fd)

    async def _route(self, server_name: str) -> Route:
        table = self.table
        try:
            route = parse_route(server_name, table.base_domains)
        except RouteError as exc:
            raise Refused("bad_route", str(exc)) from exc
        if route is not None:
            return route
        if self._resolve is None:
            raise Refused("unknown_domain", server_name)
        try:
            address = await self._resolve(server_name)
        except Exception as exc:
            raise Refused("resolve_failed", f"{server_name}: {exc}") from exc
        if address is None:
            raise Refused("unknown_domain", server_name)
        # dstack relays custom domains as TLS passthrough: the app holds their certificate.
        return Route(id=address[0], port=address[1], mode=Mode.PASSTHROUGH)

    async def _route_and_relay(self, sock: socket.socket) -> None:
        cfg = self.config
        hello = self._try_hello(sock, 0)  # usually there by the time we accept: no timer
        if not isinstance(hello, ClientHello):
            try:
                async with asyncio.timeout(cfg.handshake_timeout):
                    hello = await self._peek_hello(sock)
            except TimeoutError:
                raise Refused("handshake_timeout", "no complete ClientHello in time") from None
        if hello.server_name is None:
            raise Refused("no_sni", "ClientHello without server_name")
        route = await self._route(hello.server_name)
        if route.id in RESERVED and route.mode is not Mode.PASSTHROUGH and route.base_domain:
            await self._serve_reserved(sock, route)  # dstack's `health` / `gateway`
            return
        picked = pick_backends(
            route, self.table, time.time(), top_n=cfg.top_n, handshake_stale=cfg.handshake_stale
        )
        if isinstance(picked, Refusal):
            raise Refused(picked.reason.value, picked.detail)
        ctx = None
        if route.mode is not Mode.PASSTHROUGH:
            ctx = self.certs.server_context(route.base_domain, h2=route.mode is Mode.H2)
            if ctx is None:
                raise Refused("no_certificate", route.base_domain)
        app = picked.app_id
        limit = cfg.max_connections_per_app
        if limit and self.stats.active_by_app[app] >= limit:
            raise Refused("app_limit", f"{app} has {limit} connections")
        self.stats.active_by_app[app] += 1
        try:
            await self._relay(sock, route, picked, ctx)
        finally:
            self.stats.active_by_app[app] -= 1
            if not self.stats.active_by_app[app]:
                del self.stats.active_by_app[app]

    async def _serve_reserved(self, sock: socket.socket, route: Route) -> None:
        if route.port != RESERVED_PORT:
            raise Refused("bad_route", f"{route.id} is answered on port {RESERVED_PORT} only")
        ctx = self.certs.server_context(route.base_domain, h2=route.mode is Mode.H2)
        if ctx is None:
            raise Refused("no_certificate", route.base_domain)
        self.stats.routed["reserved"] += 1
        try:
            await serve_reserved(self._loop, sock, route.id, ctx, self.config.handshake_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            raise Refused("tls_handshake_failed", repr(exc)) from exc

    async def _relay(
        self, sock: socket.socket, route: Route, picked: Selection, ctx: ssl.SSLContext | None
    ) -> None:
        cfg = self.config
        link = Link(
            half_close=self._half_close,
            idle_timeout=cfg.idle_timeout,
            total_timeout=cfg.total_timeout,
            buffered_client=ctx is not None,  # TLS: see relay.BufferedHalf
        )
        addrs = None
        if any(b.proxy_protocol for b in picked.backends):
            addrs = sock.getpeername()[:2], sock.getsockname()[:2]
        try:
            if ctx is None:  # passthrough: dial first, the ClientHello is still in the kernel
                backend, half, backend_tr = await self._connect_first(link, picked.backends)
                try:
                    client_tr, _ = await self._loop.connect_accepted_socket(
                        lambda: link.client, sock
                    )
                except OSError as exc:
                    raise Refused("client_error", repr(exc)) from exc
            else:
                try:
                    client_tr, _ = await self._loop.connect_accepted_socket(
                        lambda: link.client,
                        sock,
                        ssl=ctx,
                        ssl_handshake_timeout=cfg.handshake_timeout,
                    )
                except (ssl.SSLError, OSError, TimeoutError) as exc:
                    raise Refused("tls_handshake_failed", repr(exc)) from exc
                backend, half, backend_tr = await self._connect_first(link, picked.backends)
        except BaseException:
            link.abort()
            raise
        header = b""
        if addrs is not None:
            header = encode_proxy_header(backend.proxy_protocol, *addrs)
        link.join(client_tr, half, backend_tr, header)
        self.stats.routed[route.mode.name.lower()] += 1
        try:
            await link.wait_closed()
        except asyncio.CancelledError:
            link.abort()
            raise
        if link.timed_out:
            self.stats.refused["timeout"] += 1

    async def _connect_first(
        self, link: Link, backends: tuple[Backend, ...]
    ) -> tuple[Backend, Half, asyncio.BaseTransport]:
        """Dial every backend at once; keep the first that connects, close the rest."""
        if len(backends) == 1:
            return await self._connect_one(link, backends[0])
        attempts: dict[asyncio.Task[tuple[asyncio.BaseTransport, Half]], Backend] = {}
        for b in backends:
            coro = self._loop.create_connection(link.new_backend_half, b.ip, b.port)
            attempts[asyncio.ensure_future(coro)] = b
        errors: list[str] = []
        winner: tuple[Backend, Half, asyncio.BaseTransport] | None = None
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                pending = set(attempts)
                while pending and winner is None:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        if task.exception() is not None:
                            errors.append(f"{attempts[task].ip}: {task.exception()}")
                        elif winner is None:
                            transport, half = task.result()
                            winner = (attempts[task], half, transport)
        except TimeoutError:
            raise Refused("connect_timeout", f"{len(backends)} backend(s)") from None
        finally:
            for task in attempts:
                task.cancel()
            results = await asyncio.gather(*attempts, return_exceptions=True)
            for result in results:
                if isinstance(result, tuple) and (winner is None or result[1] is not winner[1]):
                    with contextlib.suppress(Exception):
                        result[0].close()  # lost the race
        if winner is None:
            raise Refused("connect_failed", "; ".join(errors))
        return winner

    async def _connect_one(
        self, link: Link, backend: Backend
    ) -> tuple[Backend, Half, asyncio.BaseTransport]:
        """`_connect_first` for one backend, without a task per attempt."""
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                try:
                    transport, half = await self._loop.create_connection(
                        link.new_backend_half, backend.ip, backend.port
                    )
                except Exception as exc:  # as _connect_first: any failure is a failed dial
                    raise Refused("connect_failed", f"{backend.ip}: {exc}") from exc
        except TimeoutError:
            raise Refused("connect_timeout", "1 backend(s)") from None
        return backend, half, transport
