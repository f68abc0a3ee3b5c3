"""``pydstack vm ls|info|start|stop|rm|logs|update`` and ``pydstack image ls``.

Reads fold the log (no VMM needed); writes are command events checked first with the VMM's
own rules (``pydstack.core.vmm``); ``logs`` and ``image ls`` ask a host's VMM API (``--vmm``,
``$PYDSTACK_VMM`` or the local `up`'s)::

    pydstack vm ls --json
    pydstack vm stop web-1 --force
    pydstack vm update web-1 --vcpu 4 --port 8080:80
    pydstack vm logs web-1 -f
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import click

from pydstack.actors.vmm._view import LogView
from pydstack.adapters.nats import ConflictError, EventStore
from pydstack.adapters.vmm_api import VmmApi, VmmApiError, read_token
from pydstack.core.events import PortMap, VmUpdateRequested, subject
from pydstack.core.vmm import Refused, decide_command, decide_update

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
from .commands import _Port, _Size, vm_group

RETRIES = 3  # decide-and-append rounds lost to other writers before giving up


async def _view(store: EventStore) -> LogView:
    view = LogView()
    await view.catch_up(store)
    return view


def _row(view: LogView, vm_id: str) -> dict[str, Any]:
    from pydstack.actors.vmm import vm_info

    info = vm_info(view.vms[vm_id])
    host = view.hosts.get(info["host"])  # where it runs: its host's platform (HostJoined)
    info["platform"] = (host.platform if host else "") or "unknown"
    return info


@vm_group.command("ls")
@connection_options
@click.option("--all", "show_all", is_flag=True, help="include removed VMs")
@json_option
@click.pass_context
def vm_ls(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """List VMs from the log."""

    async def go() -> list[dict[str, Any]]:
        async with await connect(resolve(ctx)) as store:
            view = await _view(store)
        from pydstack.actors.vmm import vm_info

        recs = sorted(view.vms.values(), key=lambda r: r.vm.requested_ns)
        return [vm_info(r, brief=True) for r in recs if show_all or r.vm.state != "removed"]

    rows = run(go())
    if as_json:
        for r in rows:
            echo_json(r)
        return
    click.echo(f"{'ID':38} {'NAME':16} {'STATE':9} {'HOST':12} {'CID':>5} BOOT")
    for r in rows:
        click.echo(f"{r['id']:38} {r['name'][:16]:16} {r['status']:9} {r['host'][:12]:12} "
                   f"{r['cid']:>5} {r['boot_progress']}")  # fmt: skip


@vm_group.command("info")
@connection_options
@click.argument("vm_id")
@json_option
@click.pass_context
def vm_info_cmd(ctx: click.Context, vm_id: str, as_json: bool) -> None:
    """One VM: state, placement, configuration, restart track."""

    async def go() -> dict[str, Any]:
        async with await connect(resolve(ctx)) as store:
            view = await _view(store)
        if vm_id not in view.vms:
            raise click.ClickException(f"no vm {vm_id}")
        return _row(view, vm_id)

    info = run(go())
    if as_json:
        echo_json(info)
        return
    for k, v in info.items():
        if k != "configuration":
            click.echo(f"{k}: {v}")
    for k, v in info["configuration"].items():
        if k != "compose_file":
            click.echo(f"configuration.{k}: {v}")


def _command(ctx: click.Context, vm_id: str, action: str, force: bool = False) -> None:
    async def go() -> int:
        async with await connect(resolve(ctx)) as store:
            for attempt in range(RETRIES):
                view = await _view(store)
                rec = view.vms.get(vm_id)
                try:
                    event = decide_command(rec.vm if rec else None, vm_id, action, force=force)
                    subj = subject("vm", vm_id)
                    await refuse_if_refused(store, [(subj, event)])
                    return (await store.append(subj, [event], view.version(subj))).seq
                except Refused as exc:
                    raise click.ClickException(str(exc)) from None
                except ConflictError:
                    # Another writer, or (just after a leader election) a replica that had not
                    # caught up when we read: read again and decide again.
                    if attempt == RETRIES - 1:
                        raise click.ClickException(f"vm {vm_id} changed meanwhile; retry") from None
            raise AssertionError("unreachable")

    seq = run(go())
    click.echo(f"{action} requested for vm {vm_id} (seq {seq})")


@vm_group.command("start")
@connection_options
@click.argument("vm_id")
@click.pass_context
def vm_start(ctx: click.Context, vm_id: str) -> None:
    """Ask for the VM to run (also resets an exhausted auto-restart)."""
    _command(ctx, vm_id, "start")


@vm_group.command("stop")
@connection_options
@click.argument("vm_id")
@click.option("--force", is_flag=True, help="kill instead of a graceful power-off")
@click.pass_context
def vm_stop(ctx: click.Context, vm_id: str, force: bool) -> None:
    """Ask for the VM to stop (graceful unless --force)."""
    _command(ctx, vm_id, "stop", force)


@vm_group.command("rm")
@connection_options
@click.argument("vm_id")
@click.pass_context
def vm_rm(ctx: click.Context, vm_id: str) -> None:
    """Remove the VM (its host deletes the CVM and gives the room back)."""
    _command(ctx, vm_id, "remove")


@vm_group.command("update")
@connection_options
@click.argument("vm_id")
@click.option("--compose", "compose_file", type=click.Path(dir_okay=False), help="app-compose.json")
@click.option("--env-file", type=click.Path(dir_okay=False), help="sealed env (bytes as is)")
@click.option("--user-config", default=None)
@click.option("--port", "ports", type=_Port(), multiple=True, help="replace the port maps")
@click.option("--no-ports", is_flag=True, help="remove every port map")
@click.option("--vcpu", type=click.IntRange(1, 1024), default=None)
@click.option("--memory", type=_Size(), default=None)
@click.option("--disk", type=_Size(), default=None, help="grow the disk (never shrinks)")
@click.option("--image", default=None)
@click.pass_context
def vm_update(
    ctx: click.Context, vm_id: str, compose_file: str | None, env_file: str | None,
    user_config: str | None, ports: tuple[PortMap, ...], no_ports: bool, vcpu: int | None,
    memory: int | None, disk: int | None, image: str | None,
) -> None:  # fmt: skip
    """Change compose, env, ports or resources (applied at the VM's next start)."""
    compose = Path(compose_file).read_bytes() if compose_file else b""
    request = VmUpdateRequested(
        vm_id=vm_id, compose=compose, user_config=user_config,
        encrypted_env=Path(env_file).read_bytes() if env_file else None,
        ports=() if no_ports else (ports or None), vcpu=vcpu or 0, memory_mb=memory or 0,
        disk_gb=(disk // 1024) if disk else 0, image=image or "",
    )  # fmt: skip

    async def go() -> int:
        async with await connect(resolve(ctx)) as store:
            for attempt in range(RETRIES):
                view = await _view(store)
                rec = view.vms.get(vm_id)
                try:
                    host = view.hosts.get(rec.vm.host) if rec else None
                    disk_now = rec.resources.disk_gb if rec else 0
                    decide_update(rec.vm if rec else None, host, None, request,
                                  current_disk_gb=disk_now)  # fmt: skip
                    subj = subject("vm", vm_id)
                    await refuse_if_refused(store, [(subj, request)])
                    return (await store.append(subj, [request], view.version(subj))).seq
                except Refused as exc:
                    raise click.ClickException(str(exc)) from None
                except ConflictError:  # as in _command: read again and decide again
                    if attempt == RETRIES - 1:
                        raise
            raise AssertionError("unreachable")

    seq = run(go())
    what = f" (compose {hashlib.sha256(compose).hexdigest()[:16]}…)" if compose else ""
    click.echo(f"update requested for vm {vm_id}{what} (seq {seq})")


# -- through a host's VMM API --------------------------------------------------------------


def _vmm_api(ctx: click.Context, given: str | None, token_file: str | None) -> VmmApi:
    """The VMM API: --vmm URL (``unix:/path`` or ``http://host:port``), else the local `up`'s
    unix socket; a TCP URL needs the token (--vmm-token-file, else the local `up`'s file)."""
    from pydstack.controlplane import DataDir

    state = DataDir.resolve(ctx.ensure_object(Settings).data_dir).state()
    url = (given or state.get("vmm_url") or "").rstrip("/")
    if not url:
        raise click.ClickException("no VMM API known: pass --vmm URL (a host's VMM API)")
    token = ""
    if not url.startswith("unix:"):
        path = token_file or (state.get("vmm_token_file") if url == state.get("vmm_tcp_url")
                              else None)  # fmt: skip
        if not path:
            raise click.ClickException(
                f"{url}: a TCP VMM API needs its token: pass --vmm-token-file FILE"
            )
        try:
            token = read_token(Path(path))
        except VmmApiError as exc:
            raise click.ClickException(str(exc)) from None
    return VmmApi(url, token=token, timeout_s=None)


def vmm_option(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--vmm-token-file", "vmm_token_file", envvar="PYDSTACK_VMM_TOKEN_FILE",
                     metavar="FILE", help="the API token of a TCP --vmm URL")(f)  # fmt: skip
    return click.option("--vmm", "vmm", envvar="PYDSTACK_VMM", metavar="URL",
                        help="a host's VMM API: unix:/path or http://host:port "
                        "[default: the local `up`'s socket]")(f)  # fmt: skip


@vm_group.command("logs")
@connection_options
@vmm_option
@click.argument("vm_id")
@click.option("-f", "--follow", is_flag=True, help="keep printing new output")
@click.pass_context
def vm_logs(
    ctx: click.Context, vmm: str | None, vmm_token_file: str | None, vm_id: str, follow: bool
) -> None:
    """The CVM's console (guest and app output), from its host's VMM."""
    path = f"/logs/{vm_id}" + ("?follow=1" if follow else "")

    async def go() -> None:
        try:
            async with _vmm_api(ctx, vmm, vmm_token_file) as api, api.get(path) as r:
                if r.status != 200:
                    raise click.ClickException((await r.json()).get("error", f"HTTP {r.status}"))
                async for chunk in r.content.iter_any():
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
        except aiohttp.ClientError as exc:
            raise click.ClickException(f"VMM API: {exc}") from None

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        raise SystemExit(130) from None


@click.group("image")
def image_group() -> None:
    """Guest images on a host."""


@image_group.command("ls")
@connection_options
@vmm_option
@json_option
@click.pass_context
def image_ls(
    ctx: click.Context, vmm: str | None, vmm_token_file: str | None, as_json: bool
) -> None:
    """Images the host's VMM can run (dstack's ListImages)."""

    async def go() -> list[dict[str, Any]]:
        try:
            async with _vmm_api(ctx, vmm, vmm_token_file) as api:
                data = await api.call("ListImages")
        except VmmApiError as exc:
            raise click.ClickException(str(exc)) from None
        images: list[dict[str, Any]] = data.get("images", [])
        return images

    images = asyncio.run(go())
    if as_json:
        for i in images:
            echo_json(i)
        return
    for i in images:
        click.echo(f"{i['name']:24} {i.get('version', ''):10} {i.get('description', '')}")
