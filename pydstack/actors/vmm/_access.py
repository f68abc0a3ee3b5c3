"""Who may call a host's VMM API, and where it listens.

Every call creates, changes or removes CVMs, so nothing reaches it unauthenticated:

- **A unix socket** (default, ``<state_dir>/api/vmm.sock``): the socket is 0600 in a 0700
  directory, and the peer's uid (``SO_PEERCRED``) must be ours or root, so another local user,
  a QEMU guest (user networking reaches the host's TCP ports only) and a web page cannot.
- **TCP** only when the operator asks for a port, and then only with the API token (0600 file,
  ``<state_dir>/api/token``): ``Authorization: Bearer <token>``, or HTTP Basic with the token
  as password (what dstack's ``vmm-cli.py --auth-user U --auth-password TOKEN`` sends; the
  user name is not checked). The ``Host`` header must name the bind address or loopback, so
  a DNS-rebinding page gets 403 even from a browser that somehow holds the token.

Usage::

    runners, ends = await serve_api(vmm, socket=sd / "api" / "vmm.sock", tcp=("127.0.0.1", 0),
                                    token_file=sd / "api" / "token")
    ends.url        # "unix:/.../vmm.sock" (what dstack's vmm-cli --url takes)
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web

from pydstack.adapters.secretfile import write_secret

from ._actor import Vmm
from ._api import make_api

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_UNIX_PATH_MAX: Final = 107  # sun_path is 108 bytes with its NUL
_LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "[::1]")


class ApiSetupError(RuntimeError):
    """The API cannot listen as configured; the message says why and what to do."""


@dataclass(frozen=True)
class ApiEndpoints:
    """Where the API listens and what a TCP client authenticates with."""

    socket: Path | None = None
    tcp_url: str = ""
    token_file: Path | None = None

    @property
    def url(self) -> str:
        """The preferred address: ``unix:<path>`` (dstack's vmm-cli form), else the TCP URL."""
        return f"unix:{self.socket}" if self.socket else self.tcp_url


def read_or_create_token(path: Path) -> str:
    """The API token in ``path``; a new random one when the file does not exist yet (created
    0600 from its first byte, in a 0700 directory when that is new)."""
    try:
        write_secret(path, secrets.token_urlsafe(32) + "\n", overwrite=False)
    except FileExistsError:
        pass
    token = path.read_text().strip()
    if len(token) < 32:
        raise ApiSetupError(f"{path}: the API token is shorter than 32 characters")
    return token


def presented_token(header: str) -> str:
    """The token in an ``Authorization`` header (Bearer, or Basic's password), else ""."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return ""
        return decoded.partition(":")[2]
    return ""


def allowed_hosts(bind_host: str, port: int) -> frozenset[str]:
    """``Host`` header values a TCP client may send: the bind address or a loopback name,
    with the port (also without it when the port is 80)."""
    bind = f"[{bind_host}]" if ":" in bind_host else bind_host
    names = {bind, *_LOOPBACK_NAMES} - {"0.0.0.0", "[::]"}
    return frozenset({f"{n}:{port}" for n in names} | (names if port == 80 else set()))


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def tcp_guard(token: str, bind_host: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Host allowlist, then the token; the port is the one the connection arrived on."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        local = request.transport.get_extra_info("sockname") if request.transport else None
        hosts = allowed_hosts(bind_host, int(local[1]) if local else -1)
        if request.headers.get("Host", "").lower() not in hosts:
            return _error(403, "Host header not allowed for this VMM API")
        given = presented_token(request.headers.get("Authorization", ""))
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            return _error(401, "the VMM API needs its token (Authorization: Bearer <token>)",
                          **{"WWW-Authenticate": 'Basic realm="pydstack-vmm"'})  # fmt: skip
        return await handler(request)

    return guard


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process at the other end of a unix-socket request (SO_PEERCRED)."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


@web.middleware
async def unix_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    # The 0700 directory already keeps others out; this holds even if someone loosened it.
    uid = peer_uid(request)
    if uid is None or uid not in (0, os.getuid()):
        return _error(403, f"uid {uid} may not use this VMM API")
    return await handler(request)


async def _start(
    app: web.Application, site: Callable[[web.AppRunner], web.BaseSite]
) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await site(runner).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def _prepare_socket(path: Path) -> None:
    if len(str(path).encode()) > _UNIX_PATH_MAX:
        raise ApiSetupError(f"VMM API socket path {path} is longer than {_UNIX_PATH_MAX} bytes")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    path.unlink(missing_ok=True)  # a stale socket of an earlier run; the data dir lock is ours


async def _serve_unix(app: web.Application, path: Path) -> web.AppRunner:
    _prepare_socket(path)
    runner = await _start(app, lambda r: web.UnixSite(r, str(path)))
    os.chmod(path, 0o600)
    return runner


async def serve_api(
    vmm: Vmm,
    *,
    socket: Path | None,
    tcp: tuple[str, int] | None = None,
    token_file: Path | None = None,
) -> tuple[list[web.AppRunner], ApiEndpoints]:
    """Serve the VMM API on the unix socket and, when ``tcp`` is given, on TCP with the token
    in ``token_file`` (created when missing). Returns the runners (clean them up) and where."""
    if socket is None and tcp is None:
        raise ApiSetupError("the VMM API needs a unix socket or a TCP port")
    if tcp is not None and token_file is None:
        raise ApiSetupError("a TCP VMM API needs a token file")
    runners: list[web.AppRunner] = []
    tcp_url = ""
    try:
        if socket is not None:
            runners.append(await _serve_unix(make_api(vmm, [unix_guard]), socket))
        if tcp is not None and token_file is not None:
            host, port = tcp
            token = read_or_create_token(token_file)
            sites: list[web.TCPSite] = []

            def tcp_site(r: web.AppRunner) -> web.TCPSite:
                sites.append(web.TCPSite(r, host, port))
                return sites[0]

            runners.append(await _start(make_api(vmm, [tcp_guard(token, host)]), tcp_site))
            shown = f"[{host}]" if ":" in host else host
            tcp_url = f"http://{shown}:{_bound_port(sites[0], port)}"
    except BaseException:
        for r in runners:
            await r.cleanup()
        raise
    return runners, ApiEndpoints(socket, tcp_url, token_file if tcp_url else None)


def _bound_port(site: web.TCPSite, asked: int) -> int:
    server = site._server  # aiohttp exposes the bound port only here
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else asked
