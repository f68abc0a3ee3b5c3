"""Who may talk to the dashboard: a Host allowlist, a login token and a CSRF token.

A DNS-rebinding page reaches the dashboard under the attacker's own name, so its Host and
Origin agree with each other; only a list of the names the dashboard really has tells it
apart. So every request must name an allowed Host (reads too: a rebound page could read the
views and the event stream). Every write (any method but GET/HEAD) must either come from the
dashboard's own page (Origin equal to the Host, and the per-process CSRF token the page got
in its ``<meta name="csrf-token">`` sent back as ``X-CSRF-Token``) or carry the login token as
``Authorization: Bearer`` (non-browser clients: no browser sends that header on its own). On
a bind that is not loopback every request needs the login token as well: the Bearer header,
or the HttpOnly SameSite=Strict cookie that opening ``/?token=...`` once sets. A tenant's login
token (``pydstack tenant add NAME --dashboard``: ``tenants_dir/NAME.token``) logs in as that
tenant: its writes are signed with the tenant's key (``request[TENANT]``). Usage::

    token = load_or_create_token(data_dir / "dashboard" / "login-token")   # 0600
    guard = Guard.create("127.0.0.1", 8080, ("dash.lan",), login_token=token)
    app = create_app(services, guard)   # its middleware enforces all of the above
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from pydstack.adapters.secretfile import SecretFileError, read_secret, write_secret

from ._services import error_response

CSRF_HEADER: Final = "X-CSRF-Token"
_READS: Final = frozenset({"GET", "HEAD"})
_TOKEN: Final = re.compile(r"^[A-Za-z0-9_-]{32,}$")
_LOGIN: Final = ("login: send the login token (Authorization: Bearer TOKEN, or open "
                  "/?token=TOKEN once); `pydstack up` says where it is")  # fmt: skip
_NAME: Final = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GuardError(ValueError):
    """The dashboard's access settings are unusable (one line, what to do)."""


def is_loopback(bind: str) -> bool:
    """Whether only this machine can reach a socket bound to ``bind``. ``localhost`` and
    127.0.0.0/8, ::1 are; the wildcard addresses and every other name are not."""
    if bind.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False


def needs_login(bind: str) -> bool:
    """The login token is required on every request unless the bind is loopback."""
    return not is_loopback(bind)


def _host_literal(host: str) -> str:
    """``host`` as it appears in a Host header: lower case, an IPv6 address in brackets."""
    bare = host.strip("[]").lower()
    try:
        return f"[{bare}]" if ipaddress.ip_address(bare).version == 6 else bare
    except ValueError:
        return bare


def parse_host(entry: str) -> tuple[str, int | None]:
    """``NAME``, ``NAME:PORT``, an IP address, ``[IPv6]:PORT``: the name as a Host header has
    it, and the port (None: none given)."""
    text = entry.strip().lower()
    if text.startswith("["):
        name, sep, rest = text[1:].partition("]")
        if not sep or not _is_ip(name) or rest[:1] not in ("", ":"):
            raise GuardError(f"dashboard host {entry!r}: give [IPv6] or [IPv6]:PORT")
        port = rest[1:]
    elif text.count(":") > 1:  # a bare IPv6 address
        name, port = text, ""
    else:
        name, _, port = text.partition(":")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise GuardError(f"dashboard host {entry!r}: bad port; give NAME or NAME:PORT")
    if not (_is_ip(name) or _NAME.match(name)):
        raise GuardError(f"dashboard host {entry!r}: not a host name or IP address")
    return _host_literal(name), int(port) if port else None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def allowed_hosts(bind: str, port: int, extra: tuple[str, ...] = ()) -> frozenset[str]:
    """The Host headers the dashboard answers: its bind address with the port (unless it is
    the wildcard); the loopback names when it is reachable on loopback (a loopback or a
    wildcard bind: the machine's other addresses must be named in ``extra``); and each of
    ``extra`` (with the port, or as given when it names one; a name given without a port is
    also accepted bare, as a reverse proxy on the default port sends it)."""
    try:
        wildcard = ipaddress.ip_address(bind.strip("[]")).is_unspecified
    except ValueError:
        wildcard = False
    out = set() if wildcard else {f"{_host_literal(bind)}:{port}"}  # 0.0.0.0 names no host
    if is_loopback(bind) or wildcard:
        out |= {f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"}
    for entry in extra:
        name, its_port = parse_host(entry)
        out |= {f"{name}:{its_port}"} if its_port else {name, f"{name}:{port}"}
    return frozenset(out)


def load_or_create_token(path: Path) -> str:
    """The login token in ``path``, made the first time (``write_secret``: 0600 from its first
    byte, linked into place whole; of two concurrent starts one wins and both use its token).
    A token file others may read is refused."""
    try:
        write_secret(path, secrets.token_urlsafe(32) + "\n", overwrite=False)
    except FileExistsError:
        pass
    except OSError as exc:
        raise GuardError(f"dashboard login token {path}: {exc.strerror}") from None
    try:
        token = read_secret(path).decode("ascii", "replace").strip()
    except SecretFileError as exc:
        raise GuardError(f"dashboard login token: {exc}") from None
    if not _TOKEN.match(token):
        raise GuardError(f"dashboard login token {path} is malformed; delete it to make a new one")
    return token


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


@dataclass(frozen=True)
class Guard:
    """What the middleware checks: the Host allowlist, the login token (and whether every
    request needs it), and this process's CSRF token."""

    hosts: frozenset[str]
    login_token: str
    login_required: bool
    port: int
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    tenants_dir: Path | None = None  # <NAME>.token: that tenant's login token (tenant add)

    @classmethod
    def create(
        cls, bind: str, port: int, extra_hosts: tuple[str, ...] = (), *, login_token: str = "",
        tenants_dir: Path | None = None,
    ) -> Guard:  # fmt: skip
        """The guard of a dashboard bound to ``bind``:``port`` (the port it really got)."""
        return cls(hosts=allowed_hosts(bind, port, extra_hosts),
                   login_token=login_token or secrets.token_urlsafe(32),
                   login_required=needs_login(bind), port=port,
                   tenants_dir=tenants_dir)  # fmt: skip

    def tenant_of(self, token: str) -> str | None:
        """The tenant whose login token this is (None: no tenant's). Read at each login, so a
        ``pydstack tenant add NAME --dashboard`` counts at once and a deleted file at once."""
        if self.tenants_dir is None or not token:
            return None
        found = None
        for path in sorted(self.tenants_dir.glob("*.token")):
            try:
                mine = read_secret(path).decode("ascii", "replace").strip()
            except (OSError, SecretFileError):
                continue
            if _TOKEN.match(mine) and _same(token, mine):
                found = path.stem
        return found

    @property
    def cookie(self) -> str:
        # Cookies ignore the port: one name per port keeps two dashboards' logins apart.
        return f"pydstack_login_{self.port}"


GUARD: Final = web.AppKey("guard", Guard)
TENANT: Final = web.RequestKey("tenant", str)  # the tenant logged in ("": the operator)


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get(hdrs.AUTHORIZATION)
    if auth is None:
        return None
    scheme, _, value = auth.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _same_origin(origin: str, host: str) -> bool:
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.path == "" and parts.netloc == host


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    g = request.app[GUARD]
    host = request.headers.get(hdrs.HOST, "").lower()
    if host not in g.hosts:
        return error_response(403, f"host: {host[:100] or '(none)'} is not a name of this "
                              "dashboard; add it with --dashboard-host")  # fmt: skip
    bearer = _bearer(request)
    query = request.query.get("token") if request.method in _READS else None
    tenant = None
    for given in (bearer, query):
        if given is not None and not _same(given, g.login_token):
            tenant = tenant or g.tenant_of(given)
            if tenant is None:
                return _unauthorized("login: wrong token")
    cookie = request.cookies.get(g.cookie, "")
    cookie_ok = _same(cookie, g.login_token)  # stale: as if none
    if not cookie_ok and cookie and bearer is None and query is None:
        tenant = g.tenant_of(cookie)
        cookie_ok = tenant is not None
    if g.login_required and bearer is None and query is None and not cookie_ok:
        return _unauthorized(_LOGIN)
    request[TENANT] = tenant or ""  # the identity its writes are signed with
    if request.method not in _READS and bearer is None:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            return error_response(403, "origin: a write needs the page's Origin, or the login "
                                  "token as Authorization: Bearer")  # fmt: skip
        if not _same_origin(origin.lower(), host):
            return error_response(403, f"origin: {origin[:100]} may not send commands here")
        if not _same(request.headers.get(CSRF_HEADER, ""), g.csrf_token):
            return error_response(403, f"csrf: missing or wrong {CSRF_HEADER}; reload the page")
    resp = await handler(request)
    if query is not None and not resp.prepared:
        resp.set_cookie(g.cookie, query, path="/", httponly=True, samesite="Strict")
    return resp


def _unauthorized(message: str) -> web.Response:
    resp = error_response(401, message)
    resp.headers[hdrs.WWW_AUTHENTICATE] = 'Bearer realm="pydstack dashboard"'
    return resp
