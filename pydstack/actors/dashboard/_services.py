"""What the dashboard's handlers share: the services on the app, and JSON replies."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
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
    identities: Path | None = None  # the data dir's identities: a tenant's seed signs its writes
    simulated: bool = False  # attestation is simulated (no TDX): every page says so

    def writer(self, tenant: str) -> EventStore:
        """The store whose signer writes for ``tenant`` ("": the dashboard's own identity):
        the same connection, signing with the tenant's key from the data dir's identities."""
        if not tenant:
            return self.store
        from pydstack.adapters.nats.identity import IdentityStore
        from pydstack.core.policy import TENANT

        ident = IdentityStore(self.identities).load(tenant) if self.identities else None
        if ident is None or ident.role != TENANT:
            raise web.HTTPForbidden(text=f"login: no tenant identity {tenant!r} on this host")
        return dataclasses.replace(self.store, signer=ident.signer)


SERVICES: Final = web.AppKey("services", Services)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def writer(request: web.Request) -> EventStore:
    """The store a write of this request is signed through: the logged-in tenant's key, or
    the dashboard's own identity."""
    from ._guard import TENANT  # _guard imports this module

    return services(request).writer(request.get(TENANT, ""))


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def error_response(status: int, message: str) -> web.Response:
    """``{"error": "<field>: <problem>"}``, one line."""
    return json_response({"error": message.splitlines()[0] if message else "error"}, status)
