"""The dashboard's writing endpoints: deploy (with its preview and env key) and VM commands.

Each command is decided on its aggregate read fresh from the store and appended with that
aggregate's version (compare-and-set), retried when another writer got there first, under
the store's identity (``operator``), or the logged-in tenant's (``_services.writer``). Bad
input raises ``BadInput`` (400, naming the field); a write the policy would refuse (another
owner's app: ``operator`` owns only the apps it registered) is 403 with one line, nothing
appended. A write that meets a leader election waits it out for up to `LEADER_WAIT_S`
(the same bytes and message ids each try: it lands once), then answers 503.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

import structlog
from aiohttp import web

from pydstack.actors.trust import would_refuse
from pydstack.adapters.nats import NEW, Change, ConflictError, Recorded, riding_out
from pydstack.core.events import AppRegistered, AppUpgraded, SubjectError, subject
from pydstack.core.policy import Refused
from pydstack.core.projections import App, Applied, Vm, applied
from pydstack.core.projections import apps as apps_fold
from pydstack.core.projections import vms as vms_fold
from pydstack.core.retry import Backoff

from ._commands import (
    BadInput,
    CommandRequest,
    ComposeRequest,
    DeployRequest,
    build_app_compose,
    compose_ids,
    decide_vm_command,
    decode_body,
    plan_deploy,
)
from ._envkey import EnvKeyError
from ._services import error_response, json_response, services, writer

RETRIES: Final = 3
LEADER_WAIT_S: Final = 20.0  # under a browser's patience; the CLI waits 30 s
_log = structlog.get_logger("pydstack.dashboard")


def _rides_out(
    handler: Callable[[web.Request], Awaitable[web.Response]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler's store calls wait out a stream without a leader (this request only: the
    actors sharing the connection keep failing fast)."""

    async def wrapped(request: web.Request) -> web.Response:
        with riding_out(Backoff(LEADER_WAIT_S), notify=lambda line: _log.warning(line)):
            return await handler(request)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


_HEX40: Final = re.compile(r"^[0-9a-f]{40}$")


async def env_key(request: web.Request) -> web.Response:
    app_id = request.query.get("app_id", "").lower().removeprefix("0x")
    if not _HEX40.match(app_id):
        raise BadInput("app_id", "expected 20 bytes as 40 hex digits")
    key = await services(request).env_key.get(app_id)
    return json_response({"public_key": key.public_key, "source": key.source, "detail": key.detail})


async def compose_preview(request: web.Request) -> web.Response:
    """Build the app-compose from the form; the ids, and the key to seal the env to."""
    s = services(request)
    req = decode_body(await request.read(), ComposeRequest)
    text = build_app_compose(req)
    app_id, compose_hash, doc = compose_ids(text)
    key: dict[str, str] | None = None
    key_error = ""
    try:
        k = await s.env_key.get(app_id)
        key = {"public_key": k.public_key, "source": k.source, "detail": k.detail}
    except EnvKeyError as exc:
        key_error = str(exc)
    known = s.state.proj.apps.get(app_id)
    registered = "new" if known is None or known.removed else (
        "registered" if known.compose_hash == compose_hash else "upgrade")  # fmt: skip
    return json_response({"app_compose": text, "compose_hash": compose_hash, "app_id": app_id,
                  "allowed_envs": doc.get("allowed_envs") or [], "env_key": key,
                  "env_key_error": key_error, "app_status": registered})  # fmt: skip


def _fold_app(history: list[Recorded]) -> App | None:
    state = None
    for a in _applied(history):
        state = apps_fold.apply(state, a)
    return state


def _fold_vm(history: list[Recorded]) -> Vm | None:
    state = None
    for a in _applied(history):
        state = vms_fold.apply(state, a)
    return state


def _applied(history: list[Recorded]) -> list[Applied]:
    out = []
    for rec in history:
        try:
            a = applied(rec.seq, rec.data, rec.time_ns)
        except ValueError:
            continue  # not ours to judge; `pydstack audit` reports it
        if a is not None:
            out.append(a)
    return out


@_rides_out
async def deploy(request: web.Request) -> web.Response:
    """AppRegistered (unless already registered; AppUpgraded for a new compose of a named app
    id) and VmRequested, in one atomic commit."""
    store = writer(request)
    req = decode_body(await request.read(), DeployRequest)
    plan = plan_deploy(req, vm_id=str(uuid.uuid4()))
    app_subj, vm_subj = subject("app", plan.app_id), subject("vm", plan.request.vm_id)
    for attempt in range(RETRIES):
        history, version = await store.read_aggregate(app_subj)
        app = _fold_app(history)
        changes = []
        if app is None or app.removed:
            outcome = "registered"
            register = AppRegistered(
                app_id=plan.app_id,
                compose_hash=plan.compose_hash,
                name=plan.app_name,
                compose=plan.compose,
            )
            changes.append(Change(app_subj, [register], version))
        elif app.compose_hash == plan.compose_hash:
            outcome = "unchanged"
        else:
            outcome = "upgraded"
            upgrade = AppUpgraded(
                app_id=plan.app_id,
                compose_hash=plan.compose_hash,
                previous_compose_hash=app.compose_hash,
                compose=plan.compose,
            )
            changes.append(Change(app_subj, [upgrade], version))
        if (await store.last_by_subject(vm_subj)) is not None:
            raise BadInput("vm_id", f"vm {plan.request.vm_id} already exists; choose another")
        changes.append(Change(vm_subj, [plan.request], NEW))
        refused = await would_refuse(store, [(c.subject, e) for c in changes for e in c.events])
        if refused is not None:
            return _refused(refused)
        try:
            done = await store.commit(changes)
        except ConflictError:
            if attempt == RETRIES - 1:
                raise
            continue
        return json_response({"app_id": plan.app_id, "compose_hash": plan.compose_hash,
                      "vm_id": plan.request.vm_id, "app": outcome,
                      "seq": done[vm_subj].seq}, 201)  # fmt: skip
    raise AssertionError("unreachable")


def _refused(refused: Refused) -> web.Response:
    """403: the write policy would refuse it (every fold would skip it): nothing appended."""
    return error_response(403, f"refused by the write policy ({refused.reason}): "
                               f"{refused.detail}; nothing appended")  # fmt: skip


@_rides_out
async def vm_command(request: web.Request) -> web.Response:
    """POST /api/vms/{vm_id}/{start|stop|remove}: append the command event as the operator."""
    store = writer(request)
    vm_id, action = request.match_info["vm_id"], request.match_info["action"]
    body = decode_body(await request.read(), CommandRequest)
    try:
        subj = subject("vm", vm_id)
    except SubjectError as exc:
        raise BadInput("vm_id", str(exc)) from None
    for attempt in range(RETRIES):
        history, version = await store.read_aggregate(subj)
        event = decide_vm_command(_fold_vm(history), vm_id, action, force=body.force)
        refused = await would_refuse(store, [(subj, event)])
        if refused is not None:
            return _refused(refused)
        try:
            new = await store.append(subj, [event], version)
        except ConflictError:
            if attempt == RETRIES - 1:
                raise
            continue
        return json_response({"vm_id": vm_id, "event": type(event).__name__, "seq": new.seq})
    raise AssertionError("unreachable")
