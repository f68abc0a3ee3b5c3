"""The dashboard's aiohttp application: pages, JSON endpoints, live updates, commands.

Reads come from the in-memory ``LiveState``; commands are decided on the aggregate read
fresh from the store and appended with its version (compare-and-set, retried on a conflict)
under the store's identity (``operator``). Bad input is a 4xx whose ``error`` starts with the
field it is about. Who may ask at all is the guard's (``_guard``: Host allowlist, login token,
CSRF token). Usage::

    services = Services(state=state, hub=hub, store=store, env_key=DevEnvKey(...))
    app = create_app(services, Guard.create("127.0.0.1", port))
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from pydstack.adapters.nats import ConflictError, StoreError

from . import _views as views
from . import _write as write
from ._commands import BadInput, CommandRefused
from ._envkey import EnvKeyError
from ._follower import Update
from ._guard import GUARD, Guard, guard_middleware
from ._services import SERVICES, Services, error_response, json_response, services
from ._state import row_of

STATIC: Final = Path(__file__).parent / "static"
PAGES: Final = ("hosts", "apps", "vms", "keys", "gateways", "events", "deploy")
KEEPALIVE_S: Final = 15.0
_PAGE: Final = web.AppKey("page", str)  # index.html with the CSRF token in
_LIVE_VIEWS: Final = ("hosts", "apps", "vms", "keys", "gateways")
_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    # The guard checked Host, Origin and the tokens; a form post is still not JSON.
    if request.method == "POST" and request.content_type != "application/json":
        return error_response(415, "content-type: send application/json")
    try:
        return await handler(request)
    except BadInput as exc:
        return error_response(400, str(exc))
    except CommandRefused as exc:
        return error_response(exc.status, str(exc))
    except EnvKeyError as exc:
        return error_response(502, f"env_key: {exc}")
    except ConflictError as exc:
        return error_response(409, f"conflict: {exc}; try again")
    except StoreError as exc:
        return error_response(503, f"store: {exc}")
    except web.HTTPNotFound:
        if request.path.startswith("/api/"):
            return error_response(404, f"path: no endpoint {request.path}")
        raise


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    resp = await handler(request)
    if resp.prepared:  # an event stream: its headers went out already
        return resp
    resp.headers.setdefault("Content-Security-Policy", _CSP)
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "no-referrer")  # a ?token= URL stays here
    if request.path.startswith(("/api/", "/static/")):
        resp.headers.setdefault("Cache-Control", "no-cache")
    if request.path.startswith("/api/"):
        resp.headers["X-Pydstack-Seq"] = str(services(request).state.seq)
    return resp


# -- pages and reads ----------------------------------------------------------------------


async def page(request: web.Request) -> web.Response:
    """index.html with this process's CSRF token in its ``<meta name="csrf-token">``; only a
    page under an allowed Host can read it, and the page's JS sends it back on each write."""
    # no-store: a page kept across a dashboard restart would carry a token no longer valid
    return web.Response(text=request.app[_PAGE], content_type="text/html",
                        headers={"Cache-Control": "no-store"})  # fmt: skip


def _int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name, "")
    if raw == "":
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise BadInput(name, f"{raw!r} is not an integer in {lo}..{hi}")
    return int(raw)


async def status(request: web.Request) -> web.Response:
    s = services(request)
    return json_response({
        "seq": s.state.seq, "oldest_event": s.state.oldest_seq, "malformed": s.state.malformed,
        "ready": s.ready is None or s.ready.is_set(), "nats_url": s.store.url,
        "identity": s.store.signer.actor, "subscribers": len(s.hub),
        "tee": "simulated" if s.simulated else "tdx",
    })  # fmt: skip


async def hosts(request: web.Request) -> web.Response:
    return json_response(views.hosts(services(request).state))


async def apps(request: web.Request) -> web.Response:
    return json_response(views.apps(services(request).state))


async def app_detail(request: web.Request) -> web.Response:
    state = services(request).state
    app = state.proj.apps.get(request.match_info["app_id"])
    if app is None:
        raise CommandRefused(f"app_id: no app {request.match_info['app_id']}", 404)
    return json_response(views.app_json(app, state, with_compose=True))


async def vms(request: web.Request) -> web.Response:
    return json_response(views.vms(services(request).state))


async def vm_detail(request: web.Request) -> web.Response:
    vm = services(request).state.proj.vms.get(request.match_info["vm_id"])
    if vm is None:
        raise CommandRefused(f"vm_id: no vm {request.match_info['vm_id']}", 404)
    return json_response(views.vm_json(vm))


async def keys(request: web.Request) -> web.Response:
    return json_response(views.keys(services(request).state))


async def gateways(request: web.Request) -> web.Response:
    return json_response(views.gateways(services(request).state))


def _filter(request: web.Request) -> views.EventFilter:
    types = tuple(t for t in request.query.get("type", "").split(",") if t.strip())
    return views.EventFilter(subject=request.query.get("subject", "").strip(),
                             types=tuple(t.strip() for t in types))  # fmt: skip


async def events(request: web.Request) -> web.Response:
    """``?since=SEQ`` (exclusive; 0: the newest), ``limit``, ``subject``, ``type`` filters.
    Events older than the in-memory window are read from the store."""
    s = services(request)
    since = _int_query(request, "since", 0, 0, 2**63)
    limit = _int_query(request, "limit", 200, 1, 1000)
    flt = _filter(request)
    out: list[dict[str, Any]] = []
    if 0 < since < s.state.oldest_seq - 1:
        async for rec in s.store.read(from_seq=since + 1, until_seq=s.state.oldest_seq - 1):
            row = row_of(rec)
            if flt.matches(row):
                out.append(row.to_json())
                if len(out) >= limit:
                    break
    out += views.events(s.state, since, limit - len(out), flt) if len(out) < limit else []
    return json_response(out)


def _sse(update: Update) -> bytes:
    data = {"seq": update.seq, "views": sorted(update.views),
            "events": [r.to_json() for r in update.rows]}  # fmt: skip
    return f"id: {update.seq}\nevent: update\ndata: {json.dumps(data, default=str)}\n\n".encode()


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``update`` messages (new events, changed views), backlog from
    ``?since=`` or ``Last-Event-ID``."""
    s = services(request)
    last_id = request.headers.get("Last-Event-ID", "")
    since = int(last_id) if last_id.isdigit() else _int_query(request, "since", -1, 0, 2**63)
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    # Subscribe and snapshot with no await between: nothing is missed or sent twice.
    sub = s.hub.subscribe()
    seq = s.state.seq
    backlog = [r for r in s.state.events if r.seq > since] if since >= 0 else []
    try:
        hello = f"retry: 1000\nevent: hello\ndata: {json.dumps({'seq': seq})}\n\n"
        await resp.write(hello.encode())
        if backlog:
            await resp.write(_sse(Update(seq, backlog, frozenset(_LIVE_VIEWS))))
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the update when it
            # and the handler's cancel (client gone, shutdown) arrive together, losing the cancel.
            try:
                async with asyncio.timeout(KEEPALIVE_S):
                    update = await sub.get()
            except TimeoutError:
                await resp.write(b": keepalive\n\n")
                continue
            if update is None:
                break
            await resp.write(_sse(update))
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        s.hub.unsubscribe(sub)
    return resp


# Simulation is never silent: every page of a dashboard whose attestation is simulated.
SIMULATED_BANNER = (
    '<div id="tee-banner" role="alert">SIMULATED TDX: quotes are signed by a dev PKI on this '
    "host, so attestation proves nothing and nothing here is confidential. For development and "
    "tests only.</div>"
)


def create_app(services: Services, guard: Guard) -> web.Application:
    """The dashboard application over ``services``, open only as ``guard`` allows (nothing
    connects or starts here)."""
    app = web.Application(middlewares=[_headers, guard_middleware, _errors],
                          client_max_size=4 * 1024 * 1024)  # fmt: skip
    app[SERVICES] = services
    app[GUARD] = guard
    banner = SIMULATED_BANNER if services.simulated else ""
    app[_PAGE] = (STATIC / "index.html").read_text().replace(
        "{{csrf_token}}", guard.csrf_token).replace("{{tee_banner}}", banner)  # fmt: skip
    r = app.router
    r.add_get("/", page)
    for name in PAGES:
        r.add_get(f"/{name}", page)
    r.add_static("/static/", STATIC)
    r.add_get("/api/status", status)
    r.add_get("/api/hosts", hosts)
    r.add_get("/api/apps", apps)
    r.add_get("/api/apps/{app_id}", app_detail)
    r.add_get("/api/vms", vms)
    r.add_get("/api/vms/{vm_id}", vm_detail)
    r.add_get("/api/keys", keys)
    r.add_get("/api/gateways", gateways)
    r.add_get("/api/events", events)
    r.add_get("/api/stream", stream)
    r.add_get("/api/env-key", write.env_key)
    r.add_post("/api/compose", write.compose_preview)
    r.add_post("/api/deploy", write.deploy)
    r.add_post("/api/vms/{vm_id}/{action}", write.vm_command)
    return app
