"""The supervisor's HTTP API on a unix socket (JSON, dstack's supervisor routes).

Every answer is ``{"data": ...}`` or ``{"error": "one line"}`` with a 4xx/5xx status. Commands
run shielded: a client that dies mid-request (kill -9) cannot leave a half-done deploy or stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from pydstack.adapters.supervisor import ProcessConfig, StopRequest, SupervisorError

from ._core import Supervisor

SUPERVISOR_KEY = web.AppKey("supervisor", Supervisor)
EXIT_KEY = web.AppKey("exit", asyncio.Event)  # set: the server stops (POST /shutdown)
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _ok(data: Any) -> web.Response:
    return web.Response(body=msgspec.json.encode({"data": data}), content_type="application/json")


def _err(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode({"error": message}), content_type="application/json"
    )


@web.middleware
async def _errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SupervisorError as e:
        return _err(e.status, str(e))
    except msgspec.ValidationError as e:
        return _err(400, f"bad request body: {e}")
    except msgspec.DecodeError as e:
        return _err(400, f"request body is not JSON: {e}")


def _sup(request: web.Request) -> Supervisor:
    return request.app[SUPERVISOR_KEY]


async def _ping(request: web.Request) -> web.Response:
    return _ok("pong")


async def _list(request: web.Request) -> web.Response:
    return _ok(_sup(request).list())


async def _info(request: web.Request) -> web.Response:
    return _ok(_sup(request).info(request.match_info["id"]))


async def _deploy(request: web.Request) -> web.Response:
    config = msgspec.json.decode(await request.read(), type=ProcessConfig)
    return _ok(await asyncio.shield(_sup(request).deploy(config)))


async def _start(request: web.Request) -> web.Response:
    return _ok(await asyncio.shield(_sup(request).start(request.match_info["id"])))


async def _stop(request: web.Request) -> web.Response:
    body = await request.read()
    req = msgspec.json.decode(body, type=StopRequest) if body else StopRequest()
    stop = _sup(request).stop(request.match_info["id"], req.timeout_s)
    return _ok(await asyncio.shield(stop))


async def _remove(request: web.Request) -> web.Response:
    await asyncio.shield(_sup(request).remove(request.match_info["id"]))
    return _ok(None)


async def _shutdown(request: web.Request) -> web.Response:
    """Exit when idle: a VMM that stops with no CVM left leaves no supervisor behind. Refused
    (409) while any process runs: those stay supervised until they are stopped or removed."""
    running = [p.config.id for p in _sup(request).list() if p.running]
    if running:
        shown = ", ".join(running[:5]) + (", ..." if len(running) > 5 else "")
        return _err(409, f"{len(running)} process(es) still running ({shown}); not exiting")
    request.app[EXIT_KEY].set()
    return _ok(None)


def make_app(supervisor: Supervisor, exit_event: asyncio.Event | None = None) -> web.Application:
    app = web.Application(middlewares=[_errors])
    app[SUPERVISOR_KEY] = supervisor
    app[EXIT_KEY] = exit_event or asyncio.Event()
    app.router.add_get("/ping", _ping)
    app.router.add_get("/list", _list)
    app.router.add_get("/info/{id}", _info)
    app.router.add_post("/deploy", _deploy)
    app.router.add_post("/start/{id}", _start)
    app.router.add_post("/stop/{id}", _stop)
    app.router.add_delete("/remove/{id}", _remove)
    app.router.add_post("/shutdown", _shutdown)
    return app
