"""The apps read model: one ``App`` per ``dstack.app.<app_id>`` aggregate.

Usage::

    app = None
    for a in applied_events:
        app = apps.apply(app, a)
"""

from __future__ import annotations

from msgspec import Struct
from msgspec.structs import replace

from pydstack.core.events import AppComposeRevoked, AppRegistered, AppRemoved, AppUpgraded

from ._applied import Applied


class App(Struct, frozen=True, kw_only=True):
    app_id: str
    name: str = ""
    owner: str = ""
    compose_hash: str  # the current one
    compose: bytes = b""  # raw app-compose.json of the current compose_hash
    history: tuple[str, ...] = ()  # every compose hash, oldest first, current last
    revoked: tuple[str, ...] = ()  # compose hashes the owner withdrew since they were allowed
    upgrades: int = 0
    removed: bool = False
    removed_reason: str = ""
    registered_ns: int = 0
    updated_ns: int = 0
    seq: int = 0  # stream sequence of the last event that changed this app


def apply(state: App | None, a: Applied) -> App | None:
    """Fold one event into the app; events that do not concern a live app change nothing."""
    match a.event:
        case AppRegistered() as e:
            # A second registration of a live app is a duplicate; after removal it starts over.
            if state is not None and not state.removed:
                return state
            return App(
                app_id=e.app_id,
                name=e.name,
                owner=e.owner,
                compose_hash=e.compose_hash,
                compose=e.compose,
                history=(e.compose_hash,),
                registered_ns=a.time_ns,
                updated_ns=a.time_ns,
                seq=a.seq,
            )
        case AppUpgraded() as e if state is not None and not state.removed:
            return replace(
                state,
                compose_hash=e.compose_hash,
                compose=e.compose,
                history=(*state.history, e.compose_hash),
                revoked=tuple(h for h in state.revoked if h != e.compose_hash),
                upgrades=state.upgrades + 1,
                updated_ns=a.time_ns,
                seq=a.seq,
            )
        case AppComposeRevoked() as e if (
            state is not None and not state.removed and e.compose_hash in state.history
            and e.compose_hash not in state.revoked
        ):  # fmt: skip
            revoked = (*state.revoked, e.compose_hash)
            return replace(state, revoked=revoked, updated_ns=a.time_ns, seq=a.seq)
        case AppRemoved() as e if state is not None and not state.removed:
            return replace(
                state, removed=True, removed_reason=e.reason, updated_ns=a.time_ns, seq=a.seq
            )
        case _:
            return state
