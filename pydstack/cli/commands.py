"""Commands that publish command events: ``pydstack vm request``, ``pydstack app register``."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Any, Final

import click

from pydstack.adapters.nats import NEW, ConflictError
from pydstack.controlplane import DataDir
from pydstack.core.apps import BadInput, refuse_unhonoured
from pydstack.core.events import (
    AppRegistered,
    AppUpgraded,
    PortMap,
    SubjectError,
    VmRequested,
    VmResources,
    subject,
)
from pydstack.core.portmap import PortMapError, parse_port_map
from pydstack.core.projections import Applied, apps

from ._common import (
    Settings,
    connect,
    connection_options,
    echo_json,
    json_option,
    refuse_if_refused,
    resolve,
    run,
)

_SIZE: Final = re.compile(r"^(\d+)\s*([KMGT]?)i?B?$", re.IGNORECASE)
_MB: Final = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def parse_size_mb(value: str) -> int:
    """``2048``, ``512M``, ``2G``, ``1T`` → megabytes (a bare number is megabytes)."""
    m = _SIZE.match(value.strip())
    if not m:
        raise click.BadParameter(f"{value!r} is not a size; use e.g. 512M, 2G or 2048 (MB)")
    return int(int(m.group(1)) * _MB[m.group(2).upper()])


def parse_port(value: str) -> PortMap:
    """``[tcp|udp:][ADDR:]HOST_PORT:VM_PORT``, like dstack's ``--port tcp:0.0.0.0:8080:80``
    (ADDR an IP literal, ``[...]`` for IPv6)."""
    try:
        return parse_port_map(value)
    except PortMapError as exc:
        raise click.BadParameter(str(exc)) from None


class _Size(click.ParamType):  # type: ignore[type-arg]  # generic only since click 8.2
    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value if isinstance(value, int) else parse_size_mb(str(value))


class _Port(click.ParamType):  # type: ignore[type-arg]  # generic only since click 8.2
    name = "[PROTO:][ADDR:]HOST:VM"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value if isinstance(value, PortMap) else parse_port(str(value))


def _checked_subject(kind: str, agg_id: str) -> str:
    try:
        return subject(kind, agg_id)
    except SubjectError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group("vm")
def vm_group() -> None:
    """Ask for VMs (the scheduler places them on hosts)."""


@vm_group.command("request")
@connection_options
@click.option("--app-id", required=True, help="the app this VM runs (see `app register`)")
@click.option("--name", default="", help="display name [default: the app id]")
@click.option("--vcpu", type=click.IntRange(1, 1024), default=1, show_default=True)
@click.option("--memory", type=_Size(), default="2G", show_default=True, help="e.g. 512M, 2G")
@click.option("--disk", type=_Size(), default="20G", show_default=True, help="e.g. 20G")
@click.option("--image", default="", help="guest OS image name")
@click.option(
    "--port",
    "ports",
    type=_Port(),
    multiple=True,
    help="port map [tcp|udp:][ADDR:]HOST:VM, repeatable",
)
@click.option("--host", default="", help="pin to this host id")
@click.option("--vm-id", default="", help="choose the VM id [default: a new UUID]")
@json_option
@click.pass_context
def vm_request(
    ctx: click.Context,
    app_id: str,
    name: str,
    vcpu: int,
    memory: int,
    disk: int,
    image: str,
    ports: tuple[PortMap, ...],
    host: str,
    vm_id: str,
    as_json: bool,
) -> None:
    """Publish VmRequested; follow it with `pydstack events --follow --subject vm`."""
    vm_id = vm_id or str(uuid.uuid4())
    subj = _checked_subject("vm", vm_id)
    _checked_subject("app", app_id)
    event = VmRequested(
        vm_id=vm_id, app_id=app_id, name=name or app_id, image=image, ports=ports, host=host,
        resources=VmResources(vcpu=vcpu, memory_mb=memory, disk_gb=max(1, disk // 1024)),
    )  # fmt: skip
    conn = resolve(ctx)

    async def publish() -> int:
        async with await connect(conn) as store:
            await refuse_if_refused(store, [(subj, event)])
            try:
                version = await store.append(subj, [event], NEW)
            except ConflictError:
                msg = f"vm {vm_id} already exists; choose another --vm-id"
                raise click.ClickException(msg) from None
            return version.seq

    seq = run(publish())
    if as_json:
        echo_json({"vm_id": vm_id, "subject": subj, "seq": seq})
    else:
        click.echo(f"requested vm {vm_id} (seq {seq}); watch: pydstack events --follow "
                   f"--subject {subj}")  # fmt: skip


@click.group("app")
def app_group() -> None:
    """Register apps (app-compose.json, dstack-compatible ids)."""


def compose_identity(raw: bytes, source: str) -> tuple[str, str, dict[str, Any]]:
    """``(app_id, compose_hash, compose)``: sha256 of the exact bytes, app id its first 20 bytes
    unless the compose names one (as dstack derives them)."""
    try:
        compose = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise click.BadParameter(f"{source} is not JSON: {exc}", param_hint="COMPOSE") from None
    if not isinstance(compose, dict):
        raise click.BadParameter(f"{source}: expected a JSON object", param_hint="COMPOSE")
    try:
        refuse_unhonoured(compose)
    except BadInput as exc:
        raise click.BadParameter(str(exc), param_hint="COMPOSE") from None
    compose_hash = hashlib.sha256(raw).hexdigest()
    named = compose.get("app_id")
    app_id = str(named).removeprefix("0x") if named else compose_hash[:40]
    return app_id, compose_hash, compose


@app_group.command("register")
@connection_options
@click.argument("compose_file", metavar="COMPOSE", type=click.Path(dir_okay=False))
@click.option("--name", default=None, help="app name [default: the compose's name]")
@click.option("--owner", default="", help="who owns the app")
@json_option
@click.pass_context
def app_register(
    ctx: click.Context, compose_file: str, name: str | None, owner: str, as_json: bool
) -> None:
    """Publish AppRegistered for an app-compose.json (AppUpgraded if its app id exists)."""
    path = Path(compose_file)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror}"
        raise click.BadParameter(msg, param_hint="COMPOSE") from None
    app_id, compose_hash, compose = compose_identity(raw, str(path))
    subj = _checked_subject("app", app_id)
    name = name if name is not None else str(compose.get("name", ""))
    conn = resolve(ctx)

    async def publish() -> tuple[str, int]:
        async with await connect(conn) as store:
            history, version = await store.read_aggregate(subj)
            state = None
            for rec in history:
                a = _applied(rec.seq, rec.data)
                state = apps.apply(state, a) if a else state
            if state is not None and not state.removed:
                if state.compose_hash == compose_hash:
                    return "unchanged", version.seq
                upgrade = AppUpgraded(
                    app_id=app_id,
                    compose_hash=compose_hash,
                    previous_compose_hash=state.compose_hash,
                    compose=raw,
                )
                await refuse_if_refused(store, [(subj, upgrade)])
                return "upgraded", (await store.append(subj, [upgrade], version)).seq
            event = AppRegistered(app_id=app_id, compose_hash=compose_hash, name=name,
                                  compose=raw, owner=owner)  # fmt: skip
            await refuse_if_refused(store, [(subj, event)])
            return "registered", (await store.append(subj, [event], version)).seq

    outcome, seq = run(publish())
    if as_json:
        echo_json({"app_id": app_id, "compose_hash": compose_hash, "outcome": outcome,
                   "seq": seq})  # fmt: skip
    else:
        click.echo(f"{outcome} app {app_id} (compose {compose_hash[:16]}…, seq {seq})")


def _applied(seq: int, data: bytes) -> Applied | None:
    from pydstack.core.projections import applied

    try:
        return applied(seq, data)
    except ValueError:
        return None  # not ours to judge here; `pydstack audit` reports it


@click.command("init")
@connection_options
@click.option(
    "--replicas",
    type=click.IntRange(1, 5),
    default=1,
    show_default=True,
    help="stream replicas (3 on a 3-node cluster)",
)
@click.pass_context
def init_cmd(ctx: click.Context, replicas: int) -> None:
    """Create the stream on the server if it is missing (idempotent; `up` does it too).

    Uses the data dir's `admin` identity unless --as/--creds say otherwise.
    """
    settings = ctx.ensure_object(Settings)
    if not settings.identity and not settings.creds:
        settings.identity = "admin" if DataDir.resolve(settings.data_dir).identities.load(
            "admin") else None  # fmt: skip
    conn = resolve(ctx)

    async def create() -> int:
        async with await connect(conn, replicas=replicas) as store:
            await store.ensure_stream()
            return await store.last_seq()

    last = run(create())
    click.echo(f"stream {conn.stream} is ready at {conn.url} (last seq {last})")
