"""The ``log`` authorization backend: the log itself says which composes an app may run.

For each request the KMS reads the app's aggregate (``dstack.app.<app_id>``), keeps the events
the write policy allows (so only the app's owner, the key that registered it, or an admin
counts) and allows the attested compose hash only if one of them names it
(``core/kms/log_auth``). A KMS is never authorized by it (as with ``dev``: replicas need the
onboarding token or an allow-listed measurement)::

    backend = LogBackend(store)
    verdict = await backend.authorize_app(boot)
"""

from __future__ import annotations

from pydstack.actors.trust import Judge
from pydstack.adapters.nats import EventStore
from pydstack.core.events import subject
from pydstack.core.kms.auth import AuthVerdict, BootInfo
from pydstack.core.kms.log_auth import LOG_NOT_FOR_KMS, allowed_composes, decide_log_auth


async def allowed_on_log(store: EventStore, app_id: str) -> frozenset[str]:
    """The compose hashes the log allows ``app_id`` (hex) now (also the gateway's check of
    an instance that comes back with another compose)."""
    app = app_id.lower().removeprefix("0x")
    if len(app) != 40 or any(c not in "0123456789abcdef" for c in app):
        return frozenset()
    records, _ = await store.read_aggregate(subject("app", app))
    # a fresh judge per request: the app's owner is decided by its own first event
    admitted = await Judge("kms-log-auth", store.anchor).admitted(store, records)
    return allowed_composes(ok.event for ok in admitted)


class LogBackend:
    """Allow an app the compose hashes its own history on the log names."""

    name = "log"

    def __init__(self, store: EventStore, *, gateway_app_id: str = "") -> None:
        self.store = store
        self.gateway_app_id = gateway_app_id

    async def allowed(self, app_id: str) -> frozenset[str]:
        """The compose hashes the log allows ``app_id`` (hex) now."""
        return await allowed_on_log(self.store, app_id)

    async def authorize_app(self, boot: BootInfo) -> AuthVerdict:
        return decide_log_auth(boot, await self.allowed(boot.app_id), self.gateway_app_id)

    async def authorize_kms(self, boot: BootInfo) -> AuthVerdict:
        return AuthVerdict(False, LOG_NOT_FOR_KMS)
