"""``pydstack app ls|info|upgrade|rm`` (``app register`` lives in commands.py). Usage::

    pydstack app ls
    pydstack app info 5bb4          # a unique prefix of the app id is enough
    pydstack app upgrade 5bb4 docker-compose.yaml --env-file .env
    pydstack app rm 5bb4

Each reads the whole log once and folds it with ``pydstack.core.apps.AppCatalog``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import msgspec

from pydstack.adapters.nats import Change, ConflictError, EventStore
from pydstack.core.apps import (
    AppCatalog,
    AppInfo,
    BadInput,
    CommandRefused,
    ComposeRequest,
    as_app_compose,
    boot_info_text,
    build_app_compose,
    decide_remove,
    decide_revoke_compose,
    decide_upgrade,
)
from pydstack.core.events import Event, subject
from pydstack.core.projections import App

from ._apps import kms_url_of, read_env_file, read_events, seal_env
from ._common import (
    connect,
    connection_options,
    echo_json,
    fmt_time,
    json_option,
    refuse_if_refused,
    resolve,
    run,
)
from .app_compose import app_compose_cmd as app_compose_cmd  # registers `app compose`
from .commands import app_group as app_group  # re-exported: main registers it from here
from .env import cluster_trust

RETRIES = 3


async def catalog(store: EventStore) -> AppCatalog:
    cat = AppCatalog()
    for subj, a in await read_events(store):
        cat.take(subj, a)
    return cat


def find_app(cat: AppCatalog, app_id: str) -> str:
    """The app id `app_id` names: itself, or the one app whose id starts with it."""
    key = app_id.lower().removeprefix("0x")
    known = [a.app_id for a in cat.apps()]
    if key in known:
        return key
    hits = [k for k in known if k.startswith(key)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise click.ClickException(f"{app_id!r} names {len(hits)} apps; give more of the id")
    raise click.ClickException(f"no app {app_id} on the log (pydstack app ls)")


def _status(app: App) -> str:
    return "removed" if app.removed else "active"


@app_group.command("ls")
@connection_options
@json_option
@click.pass_context
def app_ls(ctx: click.Context, as_json: bool) -> None:
    """Every app on the log: compose hash, upgrades, VMs running / total, status."""
    conn = resolve(ctx)

    async def go() -> AppCatalog:
        async with await connect(conn) as store:
            return await catalog(store)

    cat = run(go())
    rows: list[dict[str, Any]] = []
    for app in cat.apps():
        vms = cat.vms_of(app.app_id)
        live = [v for v in vms if v.state != "removed"]
        running = sum(v.state == "running" for v in vms)
        rows.append({"app_id": app.app_id, "name": app.name, "compose_hash": app.compose_hash,
                     "upgrades": app.upgrades, "vms": len(live), "running": running,
                     "status": _status(app),
                     "registered": fmt_time(app.registered_ns)})  # fmt: skip
    if as_json:
        for row in rows:
            echo_json(row)
        return
    if not rows:
        click.echo("no apps (pydstack deploy COMPOSE)")
        return
    click.echo(f"{'APP ID':<40}  {'NAME':<16} {'COMPOSE':<12}  UPG  VMS  {'STATUS':<8} REGISTERED")
    for r in rows:
        click.echo(f"{r['app_id']:<40}  {r['name'][:16]:<16} {r['compose_hash'][:12]:<12}  "
                   f"{r['upgrades']:>3}  {r['running']}/{r['vms']:<2} {r['status']:<8} "
                   f"{r['registered']}")  # fmt: skip


def info_json(info: AppInfo) -> dict[str, Any]:
    app = msgspec.to_builtins(info.app)
    app["compose"] = info.app.compose.decode(errors="replace")
    vms = []
    for v in info.vms:
        d = msgspec.to_builtins(v)
        d.pop("encrypted_env", None)
        d["encrypted_env_bytes"] = len(v.encrypted_env)
        vms.append(d)
    return {"app": app, "vms": vms, "keys": msgspec.to_builtins(info.keys),
            "gateways": msgspec.to_builtins(info.gateways)}  # fmt: skip


@app_group.command("info")
@connection_options
@click.argument("app_id")
@json_option
@click.pass_context
def app_info(ctx: click.Context, app_id: str, as_json: bool) -> None:
    """One app: compose hash history, VMs, keys issued and denied, gateway registrations."""
    conn = resolve(ctx)

    async def go() -> AppCatalog:
        async with await connect(conn) as store:
            return await catalog(store)

    cat = run(go())
    info = cat.info(find_app(cat, app_id))
    assert info is not None
    if as_json:
        echo_json(info_json(info))
        return
    a = info.app
    gone = f" (removed: {a.removed_reason or 'no reason'})" if a.removed else ""
    click.echo(f"app       {a.app_id}  {a.name or '(unnamed)'}{gone}")
    click.echo(f"compose   {a.compose_hash}  (registered {fmt_time(a.registered_ns)}, "
               f"{a.upgrades} upgrades)")  # fmt: skip
    for n, h in enumerate(a.history[:-1], 1):
        click.echo(f"  was {n:>2}  {h}{'  REVOKED' if h in a.revoked else ''}")
    if a.compose_hash in a.revoked:
        click.echo("  the current compose is REVOKED: no key for it (app upgrade to another)")
    click.echo(f"vms       {len(info.vms) or 'none'}")
    for v in info.vms:
        ports = ", ".join(f"{p.host_port}->{p.vm_port}" for p in v.ports) or "-"
        err = f"  error {v.last_error}" if v.last_error else ""
        click.echo(f"  {v.vm_id}  {v.state:<9} host {v.host or '-'}  boot {v.boot_stage or '-'}"
                   f"  ports {ports}  compose {v.compose_hash[:12] or '-'}{err}")  # fmt: skip
    click.echo(f"keys      {len(info.keys) or 'none'}")
    for k in info.keys:
        why = f"backend {k.backend}" if k.outcome == "issued" else f"reason {k.reason}"
        boot = f"; {boot_info_text(k.boot_info)}" if k.boot_info else ""
        click.echo(f"  seq {k.seq}  {fmt_time(k.time_ns)}  {k.outcome:<6} {k.request_id}  "
                   f"{why}{boot}")  # fmt: skip
    click.echo(f"gateways  {len(info.gateways) or 'none'}")
    for g in info.gateways:
        click.echo(f"  seq {g.seq}  cluster {g.cluster}  instance {g.instance_id}  "
                   f"{g.tunnel_ip}  compose {g.compose_hash[:12]}  {g.status}")  # fmt: skip


async def _commit_with_vms(
    store: EventStore, app_id: str, app_events: list[Event], vm_events: list[Event]
) -> int:
    """App events and one event per VM subject, atomically; returns the app's new seq."""
    app_subj = subject("app", app_id)
    await refuse_if_refused(store, [
        *((app_subj, e) for e in app_events),
        *((subject("vm", str(getattr(e, "vm_id"))), e) for e in vm_events),  # noqa: B009
    ])  # fmt: skip
    for attempt in range(RETRIES):
        changes = []
        if app_events:
            _, version = await store.read_aggregate(app_subj)
            changes.append(Change(app_subj, app_events, version))
        for e in vm_events:
            subj = subject("vm", str(getattr(e, "vm_id")))  # noqa: B009  # VmCommand union
            _, version = await store.read_aggregate(subj)
            changes.append(Change(subj, [e], version))
        try:
            done = await store.commit(changes)
        except ConflictError:
            if attempt == RETRIES - 1:
                raise
            continue
        return max(v.seq for v in done.values())
    raise AssertionError("unreachable")


def _upgrade_text(path: Path, app: App, env_names: tuple[str, ...]) -> str:
    try:
        text = path.read_bytes().decode("utf-8")  # exactly: no newline translation
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="COMPOSE") from None
    if as_app_compose(text) is not None:
        return text
    if not env_names:  # keep the env names the current compose allows (the VMs' sealed env)
        current = as_app_compose(app.compose.decode(errors="replace")) or {}
        env_names = tuple(current.get("allowed_envs") or ())
    try:
        return build_app_compose(ComposeRequest(name=app.name or app.app_id[:8], compose=text,
                                                env_names=env_names))  # fmt: skip
    except BadInput as exc:
        raise click.BadParameter(str(exc), param_hint="COMPOSE") from None


@app_group.command("upgrade")
@connection_options
@click.argument("app_id")
@click.argument("compose_file", metavar="COMPOSE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--env-file", type=click.Path(dir_okay=False), help="new env (KEY=VALUE lines)")
@click.option("--kms", "kms_url", envvar="PYDSTACK_KMS", default=None, metavar="URL",
              help="KMS for the env key [default: the local `up`'s]")  # fmt: skip
@json_option
@click.pass_context
def app_upgrade(
    ctx: click.Context, app_id: str, compose_file: Path, env_file: str | None,
    kms_url: str | None, as_json: bool,
) -> None:  # fmt: skip
    """A new compose (and env) for an app, keeping its app id: AppUpgraded, and an update
    request for each of its VMs (applied at their next start)."""
    envs = read_env_file(env_file) if env_file else []
    names = tuple(dict.fromkeys(k for k, _ in envs))
    conn = resolve(ctx)

    async def go() -> dict[str, Any]:
        async with await connect(conn) as store:
            cat = await catalog(store)
            aid = find_app(cat, app_id)
            info = cat.info(aid)
            assert info is not None
            text = _upgrade_text(compose_file, info.app, names)
            blob = None
            if envs:
                url = kms_url_of(conn, kms_url)
                if not url:
                    raise click.ClickException("--env-file needs a KMS: pass --kms URL")
                trust = await cluster_trust(conn, None, store)
                blob, _ = await seal_env(url, aid, envs, trust)
            try:
                upgrade, updates = decide_upgrade(info.app, info.vms, aid, text,
                                                  encrypted_env=blob)  # fmt: skip
            except CommandRefused as exc:
                raise click.ClickException(str(exc)) from None
            if upgrade is None and not updates:
                return {"app_id": aid, "outcome": "unchanged", "vms": [], "backends": [],
                        "compose_hash": info.app.compose_hash, "seq": info.app.seq}  # fmt: skip
            seq = await _commit_with_vms(store, aid, [upgrade] if upgrade else [], [*updates])
            return {"app_id": aid, "outcome": "upgraded" if upgrade else "env updated",
                    "previous_compose_hash": info.app.compose_hash,
                    "compose_hash": upgrade.compose_hash if upgrade else info.app.compose_hash,
                    "vms": [u.vm_id for u in updates], "seq": seq,
                    "backends": sorted({k.backend for k in info.keys if k.backend})}  # fmt: skip

    r = run(go())
    if as_json:
        echo_json(r)
        return
    if r["outcome"] == "unchanged":
        click.echo(
            f"app {r['app_id']} already runs compose {r['compose_hash'][:16]}…; nothing to do"
        )
        return
    click.echo(f"{r['outcome']} app {r['app_id']}: compose {r['previous_compose_hash'][:16]}… -> "
               f"{r['compose_hash'][:16]}… (seq {r['seq']})")  # fmt: skip
    vms = ", ".join(r["vms"]) or "none"
    click.echo(f"vms: {vms} (VmUpdateRequested; each takes it at its next start)")
    used = ", ".join(r["backends"]) or "none yet"
    click.echo("the KMS checks the new compose hash when a CVM asks for its keys (webhook/eth "
               f"backends must allow it; backends that issued its keys: {used})")  # fmt: skip


@app_group.command("rm")
@connection_options
@click.argument("app_id")
@click.option("--reason", default="", help="recorded in AppRemoved")
@json_option
@click.pass_context
def app_rm(ctx: click.Context, app_id: str, reason: str, as_json: bool) -> None:
    """Remove an app: AppRemoved and a remove request for each of its VMs, atomically."""
    conn = resolve(ctx)

    async def go() -> dict[str, Any]:
        async with await connect(conn) as store:
            cat = await catalog(store)
            aid = find_app(cat, app_id)
            info = cat.info(aid)
            assert info is not None
            try:
                removed, removals = decide_remove(info.app, info.vms, aid, reason=reason)
            except CommandRefused as exc:
                raise click.ClickException(str(exc)) from None
            seq = await _commit_with_vms(store, aid, [removed], [*removals])
            return {"app_id": aid, "vms": [r.vm_id for r in removals], "seq": seq}

    r = run(go())
    if as_json:
        echo_json(r)
    else:
        vms = ", ".join(r["vms"]) or "none"
        click.echo(f"removed app {r['app_id']} (seq {r['seq']}); remove requested for vms: {vms}")


@app_group.command("revoke-compose")
@connection_options
@click.argument("app_id")
@click.argument("compose_hash")
@click.option("--reason", default="", help="recorded in AppComposeRevoked")
@json_option
@click.pass_context
def app_revoke_compose(
    ctx: click.Context, app_id: str, compose_hash: str, reason: str, as_json: bool
) -> None:
    """Withdraw one compose hash the app allowed (owner or admin): the KMS issues no key and
    the gateway admits no new registration for it from now on (a running CVM keeps what it
    has until it reboots); the rest of the history stays allowed."""
    conn = resolve(ctx)

    async def go() -> dict[str, Any]:
        async with await connect(conn) as store:
            cat = await catalog(store)
            aid = find_app(cat, app_id)
            info = cat.info(aid)
            try:
                event = decide_revoke_compose(
                    info.app if info else None, aid, compose_hash, reason=reason
                )
            except CommandRefused as exc:
                raise click.ClickException(str(exc)) from None
            seq = await _commit_with_vms(store, aid, [event], [])
            return {"app_id": aid, "compose_hash": event.compose_hash, "seq": seq}

    r = run(go())
    if as_json:
        echo_json(r)
    else:
        click.echo(f"app {r['app_id']}: compose {r['compose_hash'][:16]}… revoked (seq {r['seq']})")
