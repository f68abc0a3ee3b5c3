"""Decisions on the app aggregate for deploy, upgrade and removal. Pure.

Each takes the app (and its VMs) as folded from the log and returns the events to append,
or raises ``CommandRefused`` with a one-line reason. Usage::

    outcome, event = decide_deploy_app(app, plan)         # "registered" + AppRegistered, ...
    upgrade, updates = decide_upgrade(app, vms, text, encrypted_env=blob)
    removed, removals = decide_remove(app, vms, reason="operator")
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Literal

from pydstack.core.events import (
    AppComposeRevoked,
    AppRegistered,
    AppRemoved,
    AppUpgraded,
    VmRemoveRequested,
    VmUpdateRequested,
)
from pydstack.core.projections import App, Vm

from ._commands import CommandRefused, DeployPlan, as_app_compose
from ._fields import unhonoured

Outcome = Literal["registered", "unchanged", "upgraded"]


def decide_deploy_app(
    app: App | None, plan: DeployPlan
) -> tuple[Outcome, AppRegistered | AppUpgraded | None]:
    """What a deploy appends on the app aggregate besides its VmRequested: a new (or removed)
    app is registered, the same compose changes nothing, a new compose of a named app id is
    an upgrade (as ``pydstack app register`` and the dashboard decide)."""
    if app is None or app.removed:
        return "registered", AppRegistered(
            app_id=plan.app_id, compose_hash=plan.compose_hash, name=plan.app_name,
            compose=plan.compose,
        )  # fmt: skip
    if app.compose_hash == plan.compose_hash:
        return "unchanged", None
    return "upgraded", AppUpgraded(
        app_id=plan.app_id, compose_hash=plan.compose_hash,
        previous_compose_hash=app.compose_hash, compose=plan.compose,
    )  # fmt: skip


def live_vms(vms: Iterable[Vm], app_id: str) -> list[Vm]:
    """The app's VMs that are not removed nor being removed, oldest request first."""
    mine = [v for v in vms if v.app_id == app_id and v.state != "removed"]
    return sorted((v for v in mine if v.desired != "removed"), key=lambda v: v.requested_ns)


def decide_upgrade(
    app: App | None,
    vms: Iterable[Vm],
    app_id: str,
    compose_text: str,
    *,
    encrypted_env: bytes | None = None,
) -> tuple[AppUpgraded | None, list[VmUpdateRequested]]:
    """A new app-compose for an existing app id: ``AppUpgraded`` (None when the compose is the
    current one) and one ``VmUpdateRequested`` per live VM, carrying the new compose (and the
    new sealed env, if any), which each VM takes at its next start.

    The new compose must not name another app id: the app id stays what it is.
    """
    if app is None:
        raise CommandRefused(f"no app {app_id}; deploy it first (pydstack deploy)", 404)
    if app.removed:
        raise CommandRefused(f"app {app_id} is removed; deploy it again instead")
    doc = as_app_compose(compose_text)
    if doc is None:
        raise CommandRefused("not an app-compose.json (a JSON object with manifest_version)")
    if (found := unhonoured(doc)) is not None:
        raise CommandRefused(f"app_compose.{found[0]}: {found[1]}", 400)
    named = str(doc.get("app_id") or "").lower().removeprefix("0x")
    if named and named != app_id:
        raise CommandRefused(f"the compose names app id {named}, not {app_id}; an upgrade keeps "
                             "the app id")  # fmt: skip
    raw = compose_text.encode()
    compose_hash = hashlib.sha256(raw).hexdigest()
    allowed = doc.get("allowed_envs") or []
    if encrypted_env and not allowed:
        raise CommandRefused("the new compose allows no env vars (allowed_envs is empty)")
    upgrade = None
    if compose_hash != app.compose_hash:
        upgrade = AppUpgraded(app_id=app_id, compose_hash=compose_hash,
                              previous_compose_hash=app.compose_hash, compose=raw)  # fmt: skip
    elif encrypted_env is None:
        return None, []
    updates = [
        VmUpdateRequested(vm_id=v.vm_id, compose=raw, encrypted_env=encrypted_env)
        for v in live_vms(vms, app_id)
    ]
    return upgrade, updates


def decide_remove(
    app: App | None, vms: Iterable[Vm], app_id: str, *, reason: str = ""
) -> tuple[AppRemoved, list[VmRemoveRequested]]:
    """``AppRemoved`` and a remove request for each of its VMs not already going away."""
    if app is None:
        raise CommandRefused(f"no app {app_id}", 404)
    if app.removed:
        raise CommandRefused(f"app {app_id} is already removed")
    removals = [VmRemoveRequested(vm_id=v.vm_id) for v in live_vms(vms, app_id)]
    return AppRemoved(app_id=app_id, reason=reason), removals


def decide_revoke_compose(
    app: App | None, app_id: str, compose_hash: str, *, reason: str = ""
) -> AppComposeRevoked:
    """Withdraw one compose hash the app's history allowed: no key or route for it from then
    on. Refused for an unknown app or hash, or one already withdrawn."""
    h = compose_hash.lower().removeprefix("0x")
    if app is None:
        raise CommandRefused(f"no app {app_id}", 404)
    if app.removed:
        raise CommandRefused(f"app {app_id} is removed: nothing to revoke")
    if h not in app.history:
        raise CommandRefused(f"compose {h[:16]}… is not one app {app_id} ever allowed", 404)
    if h in app.revoked:
        raise CommandRefused(f"compose {h[:16]}… of app {app_id} is already revoked")
    return AppComposeRevoked(app_id=app_id, compose_hash=h, reason=reason)
