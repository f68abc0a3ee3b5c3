"""Events of the app aggregate, subject ``dstack.app.<app_id>``."""

from __future__ import annotations

from ._base import Event


class AppRegistered(Event, tag="AppRegistered", frozen=True):
    """An app-compose was registered; ``app_id`` is derived from it as dstack does."""

    app_id: str
    compose_hash: str
    name: str = ""
    compose: bytes = b""  # the raw app-compose.json bytes whose sha256 is compose_hash
    owner: str = ""


class AppUpgraded(Event, tag="AppUpgraded", frozen=True):
    """A new compose for the same app id (the KMS policy must still allow it)."""

    app_id: str
    compose_hash: str
    previous_compose_hash: str
    compose: bytes = b""


class AppComposeRevoked(Event, tag="AppComposeRevoked", frozen=True):
    """The owner withdraws one compose hash the app's history allowed (e.g. a version with a
    vulnerability): no key and no new gateway registration for it from now on. History stays
    add-only; only a later registration or upgrade naming the same hash allows it again."""

    app_id: str
    compose_hash: str
    reason: str = ""


class AppRemoved(Event, tag="AppRemoved", frozen=True):
    app_id: str
    reason: str = ""
