"""What the dashboard's handlers share: the services on the app, and JSON replies."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from pydstack.adapters.nats import EventStore

from ._envkey import EnvKeySource
from ._follower import Hub
from ._state import LiveState


@dataclass(frozen=True)
class Services:
    state: LiveState
    hub: Hub
    store: EventStore  # its identity signs the commands (``operator`` under `pydstack up`)
    env_key: EnvKeySource
    ready: asyncio.Event | None = None  # set once the follower has caught up


SERVICES: Final = web.AppKey("services", Services)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def error_response(status: int, message: str) -> web.Response:
    """``{"error": "<field>: <problem>"}``, one line."""
    return json_response({"error": message.splitlines()[0] if message else "error"}, status)
