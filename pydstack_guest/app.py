"""HTTP face of the guest agent: dstack's JSON RPC on dstack.sock, legacy tappd on tappd.sock.

Requests are JSON objects (bytes as hex, as dstack's prpc JSON mode has them), answers too;
on the unix sockets a GET takes its arguments from the query string instead
(`GET /GetQuote?report_data=ab..`, as dstack's prpc does). A caller mistake is a 400
`{"error": ..., "field": ...}` naming the field; an unknown method is a 404.

    app = make_app(agent)                      # POST /GetQuote {"report_data": "ab.."}
    async with serve_agent(agent, dstack_sock=path, tappd_sock=path2, tcp="127.0.0.1:8090"):
        ...

The optional TCP listener serves the same API as dstack.sock for apps that have no Unix-socket
client (busybox wget). It hands out app keys, so it must be a loopback address: inside a CVM
that is no wider than the socket. dstack's agent also listens on TCP port 8090, but on every
interface and with a public API only (`Worker.Info`, `Worker.Version`, a dashboard).

Loopback is not enough: an SSRF in any app container (a URL fetcher, an image proxy, a
redirect followed) makes GET requests to 127.0.0.1 with the attacker's query. So on the TCP
listener every method but the public `Info` and `Version` takes only ``POST`` with
``Content-Type: application/json`` (GET: 405, another type: 415): keys (`GetKey`,
`GetTlsKey`, `Sign`), quotes over a chosen report_data (`GetQuote`, `Attest`: one over
``sha512("ratls-cert:" || spki)`` of the attacker's key is an RA-TLS identity of this app)
and RTMR3 (`EmitEvent`). A browser cannot send that content type cross-origin without a
preflight, and SSRF primitives rarely choose the method and headers::

    wget -q -O - --header 'Content-Type: application/json' \
        --post-data '{"report_data":"ab"}' http://127.0.0.1:8090/GetQuote
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from .agent import GuestAgent, RequestError

AGENT_KEY: web.AppKey[GuestAgent] = web.AppKey("agent", GuestAgent)
DEFAULT_DSTACK_SOCK = "/var/run/dstack.sock"
DEFAULT_TAPPD_SOCK = "/var/run/tappd.sock"
# dstack serves dstack.sock at /run/dstack.sock (= /var/run/dstack.sock, systemd socket
# activation) and its agent's own config names /var/run/dstack/dstack.sock; the SDKs try
# both (and /run/... for each). A CVM serves the same API at every one of them.
DSTACK_SOCK_ALIASES = ("/var/run/dstack/dstack.sock",)


class _Args(msgspec.Struct, frozen=True):
    """Every RPC's arguments; proto3 semantics: absent fields take their zero value."""

    report_data: str = ""
    path: str = ""
    purpose: str = ""
    algorithm: str = ""
    subject: str = ""
    alt_names: list[str] = []
    usage_ra_tls: bool = False
    usage_server_auth: bool = False
    usage_client_auth: bool = False
    not_before: int | None = None
    not_after: int | None = None
    with_app_info: bool = False
    random_seed: bool = False
    data: str = ""
    signature: str = ""
    public_key: str = ""
    event: str = ""
    payload: str = ""
    hash_algorithm: str = ""
    prefix: str = ""


_decoder = msgspec.json.Decoder(_Args)


def _hex(value: str, field: str) -> bytes:
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise RequestError(field, f"{field} must be hex") from None


def _field_of(e: msgspec.ValidationError) -> str:
    # msgspec names the path, e.g. "Expected `bool`, got `str` - at `$.usage_ra_tls`".
    return str(e).rsplit("$.", 1)[-1].rstrip("`") if "$." in str(e) else "body"


def _query_args(request: web.Request) -> _Args:
    """A GET's arguments from its query string; a repeated name (alt_names) is a list."""
    fields: dict[str, Any] = {}
    for name in request.query:
        values = request.query.getall(name)
        fields[name] = values if name == "alt_names" else values[-1]
    try:
        # strict=False: query values are text ("true", "1700000000").
        return msgspec.convert(fields, _Args, strict=False)
    except msgspec.ValidationError as e:
        raise RequestError(_field_of(e), str(e)) from None


async def _args(request: web.Request) -> _Args:
    body = await request.read()
    if not body.strip():
        return _query_args(request) if request.method == "GET" else _Args()
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as e:
        raise RequestError(_field_of(e), str(e)) from None
    except msgspec.DecodeError as e:
        raise RequestError("body", f"request body is not JSON: {e}") from None


Method = Callable[[GuestAgent, _Args], Awaitable[dict[str, Any]]]


async def _get_quote(a: GuestAgent, x: _Args) -> dict[str, Any]:
    return await a.get_quote(_hex(x.report_data, "report_data"))


async def _attest(a: GuestAgent, x: _Args) -> dict[str, Any]:
    return await a.attest_rpc(_hex(x.report_data, "report_data"))


async def _info(a: GuestAgent, x: _Args) -> dict[str, Any]:
    return await a.info()


async def _version(a: GuestAgent, x: _Args) -> dict[str, Any]:
    return a.version()


async def _get_key(a: GuestAgent, x: _Args) -> dict[str, Any]:
    return a.get_key(x.path, x.purpose, x.algorithm)


async def _sign(a: GuestAgent, x: _Args) -> dict[str, Any]:
    return a.sign(x.algorithm, _hex(x.data, "data"))


async def _verify(a: GuestAgent, x: _Args) -> dict[str, Any]:
    return a.verify(
        x.algorithm,
        _hex(x.data, "data"),
        _hex(x.signature, "signature"),
        _hex(x.public_key, "public_key"),
    )


async def _emit_event(a: GuestAgent, x: _Args) -> dict[str, Any]:
    return await a.emit_event(x.event, _hex(x.payload, "payload"))


async def _get_tls_key(a: GuestAgent, x: _Args) -> dict[str, Any]:
    return await a.tls_key(
        a.fresh_tls_key(),
        subject=x.subject,
        alt_names=x.alt_names,
        usage_ra_tls=x.usage_ra_tls,
        usage_server_auth=x.usage_server_auth,
        usage_client_auth=x.usage_client_auth,
        with_app_info=x.with_app_info,
        not_before=x.not_before,
        not_after=x.not_after,
    )


# --- tappd (dstack < 0.5 API) ---


async def _derive_key(a: GuestAgent, x: _Args) -> dict[str, Any]:
    return await a.tls_key(
        a.derived_tls_key(x.path, x.random_seed),
        subject=x.subject or x.path,
        alt_names=x.alt_names,
        usage_ra_tls=x.usage_ra_tls,
        usage_server_auth=x.usage_server_auth,
        usage_client_auth=x.usage_client_auth,
    )


async def _derive_k256_key(a: GuestAgent, x: _Args) -> dict[str, Any]:
    r = a.get_key(x.path, x.purpose, x.algorithm)
    return {"k256_key": r["key"], "k256_signature_chain": r["signature_chain"]}


async def _tdx_quote(a: GuestAgent, x: _Args) -> dict[str, Any]:
    algo = x.hash_algorithm or "sha512"
    report_data = a.quote_report_data(_hex(x.report_data, "report_data"), algo, x.prefix)
    r = await a.get_quote(report_data)
    prefix = "" if algo == "raw" else (x.prefix or "app-data")
    return {
        "quote": r["quote"],
        "event_log": r["event_log"],
        "hash_algorithm": algo,
        "prefix": prefix,
    }


async def _raw_quote(a: GuestAgent, x: _Args) -> dict[str, Any]:
    return await _tdx_quote(a, msgspec.structs.replace(x, hash_algorithm="raw", prefix=""))


DSTACK_METHODS: dict[str, Method] = {
    "Info": _info,
    "GetQuote": _get_quote,
    "GetKey": _get_key,
    "GetTlsKey": _get_tls_key,
    "Sign": _sign,
    "Verify": _verify,
    "Attest": _attest,
    "EmitEvent": _emit_event,
    "Version": _version,
}
TAPPD_METHODS: dict[str, Method] = {
    "DeriveKey": _derive_key,
    "DeriveK256Key": _derive_k256_key,
    "TdxQuote": _tdx_quote,
    "RawQuote": _raw_quote,
    "Info": _info,
    "Version": _version,
}


# What dstack's own TCP listener answers (`Worker.Info`, `Worker.Version`): no secret, no
# quote over caller data, no measurement; GET with a query string stays fine for these.
PUBLIC_METHODS = frozenset({"Info", "Version"})


def _refused_on_tcp(name: str, request: web.Request) -> web.Response | None:
    """405/415 for a request the TCP listener must not serve (see the module's docstring)."""
    if name in PUBLIC_METHODS:
        return None
    if request.method != "POST":
        return web.json_response(
            {"error": f"{name} takes POST with a JSON body on the TCP listener, not "
             f"{request.method}", "field": "method"},
            status=405, headers={"Allow": "POST"},
        )  # fmt: skip
    if request.content_type != "application/json":
        return web.json_response(
            {"error": f"{name} takes Content-Type: application/json on the TCP listener, "
             f"not {request.content_type!r}", "field": "Content-Type"},
            status=415,
        )  # fmt: skip
    return None


def _dispatch(
    methods: dict[str, Method], strip: str, *, tcp: bool = False
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        name = request.match_info["method"].removeprefix(strip)
        method = methods.get(name)
        if method is None:
            return web.json_response({"error": f"no such method {name!r}"}, status=404)
        refused = _refused_on_tcp(name, request) if tcp else None
        if refused is not None:
            return refused
        try:
            result = await method(request.app[AGENT_KEY], await _args(request))
        except RequestError as e:
            return web.json_response({"error": str(e), "field": e.field}, status=400)
        return web.json_response(result)

    return handle


def make_app(agent: GuestAgent, *, tcp: bool = False) -> web.Application:
    """The dstack API (`/Info`, `/GetQuote`, ...); GET takes the arguments from the query.
    `tcp`: the loopback TCP listener's rules (POST + JSON but for `PUBLIC_METHODS`)."""
    app = web.Application()
    app[AGENT_KEY] = agent
    handle = _dispatch(DSTACK_METHODS, "", tcp=tcp)
    app.router.add_route("POST", "/{method}", handle)
    app.router.add_route("GET", "/{method}", handle)
    return app


def make_tappd_app(agent: GuestAgent) -> web.Application:
    """The legacy tappd API (`/prpc/Tappd.TdxQuote`, ...), plus the public `/Info` and
    `/Version` at the root: the JavaScript SDK's TappdClient inherits `info()` from
    DstackClient and asks `/Info` (dstack's tappd.sock answers that with a 404)."""
    app = web.Application()
    app[AGENT_KEY] = agent
    handle = _dispatch(TAPPD_METHODS, "Tappd.")
    app.router.add_route("POST", "/prpc/{method}", handle)
    app.router.add_route("GET", "/prpc/{method}", handle)
    public = _dispatch({k: v for k, v in TAPPD_METHODS.items() if k in PUBLIC_METHODS}, "")
    app.router.add_route("POST", "/{method}", public)
    app.router.add_route("GET", "/{method}", public)
    return app


def _prepare_socket_path(path: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        p.unlink()  # a stale socket from a previous run would make bind fail


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _unix_site(runner: web.AppRunner, path: str, mode: int) -> None:
    _prepare_socket_path(path)
    await web.UnixSite(runner, path).start()
    os.chmod(path, mode)


def loopback_address(address: str) -> tuple[str, int]:
    """`host:port` (`[::1]:port` for IPv6) of a loopback address; anything else is refused."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a name: it could resolve anywhere
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"agent TCP address must be host:port, got {address!r}")
    if not loopback:
        raise ValueError(
            f"agent TCP address {address!r} is not loopback: it hands out app keys, "
            "so only the CVM itself may reach it"
        )
    return host, int(port)


@contextlib.asynccontextmanager
async def serve_agent(
    agent: GuestAgent,
    *,
    dstack_sock: str = DEFAULT_DSTACK_SOCK,
    tappd_sock: str | None = None,
    tcp: str | None = None,
    dstack_aliases: Sequence[str] = (),
    socket_mode: int = 0o660,
) -> AsyncIterator[str | None]:
    """Serve the agent on unix sockets (the dstack API at `dstack_sock` and every path of
    `dstack_aliases`), and the dstack API also on `tcp` (a loopback `host:port`, port 0 picks
    one) until the block exits (sockets are removed then). `socket_mode`: 0660 (root and the
    socket's group) unless the caller knows better: dstack's CVMs make them 0777, so that an
    app's non-root user can connect (the QEMU guest image does the same).
    Yields the TCP address bound, as `host:port`, or None."""
    bind = loopback_address(tcp) if tcp is not None else None
    runners = [web.AppRunner(make_app(agent))]
    sites: list[tuple[web.AppRunner, str]] = [
        (runners[0], p) for p in (dstack_sock, *dstack_aliases)
    ]
    if tappd_sock is not None:
        runners.append(web.AppRunner(make_tappd_app(agent)))
        sites.append((runners[1], tappd_sock))
    paths = [p for _, p in sites]
    try:
        for runner in runners:
            await runner.setup()
        for runner, path in sites:
            await _unix_site(runner, path, socket_mode)
        bound = None
        if bind is not None:
            tcp_runner = web.AppRunner(make_app(agent, tcp=True))
            runners.append(tcp_runner)
            await tcp_runner.setup()
            site = web.TCPSite(tcp_runner, bind[0], bind[1])
            await site.start()
            host = f"[{bind[0]}]" if ":" in bind[0] else bind[0]
            bound = f"{host}:{site.port}"  # the port bound, also when 0 was asked
        yield bound
    finally:
        for runner in runners:
            await runner.cleanup()
        for path in paths:
            _remove(path)
