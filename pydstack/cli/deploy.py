"""``pydstack deploy``: from a compose file to a running, attested app, followed on the log.

    pydstack deploy docker-compose.yaml --env-file .env --port 8080:80
    pydstack deploy app-compose.json --no-wait --json

Builds dstack's app-compose (``allowed_envs`` from the env file's names): the bytes dstack's
``vmm-cli.py compose --kms --gateway --public-logs --public-sysinfo [--env-file]`` writes (other
options: ``pydstack app compose``, then deploy its output), refuses by name a field the guest
cannot honour, shows its compose hash and app id, seals the env to the app's KMS key (checked
against the KMS root on the log), appends AppRegistered + VmRequested in one atomic commit,
then follows the log until the app is ready (or fails, naming the stage) and prints its URL;
it says "reachable" only after an HTTPS GET through the gateway answered (``_reach``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import click

from pydstack.adapters.nats import NEW, Change, ConflictError, EventStore, Recorded
from pydstack.core.apps import (
    BadInput,
    ComposeRequest,
    DeployPlan,
    DeployRequest,
    Watch,
    as_app_compose,
    build_app_compose,
    compose_ids,
    decide_deploy_app,
    plan_deploy,
    step,
    waiting_for,
)
from pydstack.core.events import subject
from pydstack.core.projections import apps

from ._apps import LogContext, decoded, kms_url_of, log_context, read_env_file, seal_env
from ._common import (
    Conn,
    connect,
    connection_options,
    echo_json,
    json_option,
    refuse_if_refused,
    resolve,
    run,
)
from .commands import _Size
from .env import cluster_trust

RETRIES = 3


def _compose_text(path: Path, name: str | None, env_names: tuple[str, ...]) -> str:
    try:
        text = path.read_bytes().decode("utf-8")  # exactly, as vmm-cli: CRLF stays CRLF
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="COMPOSE") from None
    if as_app_compose(text) is not None:
        return text  # an app-compose.json is used byte for byte (its hash is the identity)
    app_name = name or path.resolve().parent.name or path.stem
    try:
        return build_app_compose(ComposeRequest(name=app_name, compose=text, env_names=env_names))
    except BadInput as exc:
        raise click.BadParameter(str(exc), param_hint="COMPOSE") from None


def gateway_urls(
    conn: Conn, ctx: LogContext, app_id: str, vm_ports: list[int], cluster: str | None = None
) -> list[str]:
    """``https://<app_id>[-<port>].<base_domain>`` per VM port (bare: port 80), for the cluster
    the app registered at (else every cluster with a node up)."""
    domains = ctx.base_domains()
    if cluster is not None:
        domains = {cluster: domains[cluster]} if cluster in domains else {}
    state = conn.data.state()
    out = []
    for domain in dict.fromkeys(domains.values()):
        suffix = ""
        proxy = str(state.get("gateway_proxy") or "")
        if state.get("gateway_domain") == domain and proxy.rpartition(":")[2] not in ("", "443"):
            suffix = f":{proxy.rpartition(':')[2]}"  # this host's gateway listens elsewhere
        for port in vm_ports or [0]:
            label = f"{app_id}-{port}" if port else app_id
            out.append(f"https://{label}.{domain}{suffix}")
    return out


async def _commit(store: EventStore, plan: DeployPlan) -> tuple[str, int]:
    app_subj, vm_subj = subject("app", plan.app_id), subject("vm", plan.request.vm_id)
    for attempt in range(RETRIES):
        history, version = await store.read_aggregate(app_subj)
        app = None
        for rec in history:
            a = decoded(rec)
            app = apps.apply(app, a) if a else app
        outcome, event = decide_deploy_app(app, plan)
        changes = [Change(app_subj, [event], version)] if event else []
        changes.append(Change(vm_subj, [plan.request], NEW))
        await refuse_if_refused(store, [(c.subject, e) for c in changes for e in c.events])
        try:
            done = await store.commit(changes)
        except ConflictError:
            if await store.last_by_subject(vm_subj) is not None:
                raise click.ClickException(
                    f"vm {plan.request.vm_id} already exists; choose another --vm-id"
                ) from None
            if attempt == RETRIES - 1:
                raise
            continue
        return outcome, done[vm_subj].seq
    raise AssertionError("unreachable")


class _Out:
    def __init__(self, as_json: bool) -> None:
        self.as_json, self.t0 = as_json, time.monotonic()

    def info(self, text: str, **obj: Any) -> None:
        if self.as_json:
            echo_json(obj)
        else:
            click.echo(text)

    def stage(self, stage: str, text: str, seq: int) -> None:
        t = round(time.monotonic() - self.t0, 2)
        if self.as_json:
            echo_json({"stage": stage, "text": text, "seq": seq, "elapsed_s": t})
        else:
            click.echo(f"{t:7.2f}s  {stage:<12} {text}")


@click.command("deploy")
@connection_options
@click.argument("compose_file", metavar="COMPOSE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--env-file", type=click.Path(dir_okay=False), help="KEY=VALUE lines to seal")
@click.option("--port", "ports", multiple=True, metavar="[PROTO:][ADDR:]HOST:VM",
              help="host port map, repeatable (e.g. 8080:80)")  # fmt: skip
@click.option("--host", default="", help="pin the VM to this host id")
@click.option("--vcpu", type=click.IntRange(1, 1024), default=1, show_default=True)
@click.option("--memory", type=_Size(), default="2G", show_default=True, help="e.g. 512M, 2G")
@click.option("--disk", type=_Size(), default="20G", show_default=True, help="e.g. 20G")
@click.option("--name", default=None, help="app name [default: the compose file's directory]")
@click.option("--image", default="", help="guest OS image name")
@click.option("--vm-id", default="", help="choose the VM id [default: a new UUID]")
@click.option("--kms", "kms_url", envvar="PYDSTACK_KMS", default=None, metavar="URL",
              help="KMS for the env key [default: the local `up`'s]")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(min=0.1), default=300.0, show_default=True,
              help="seconds to wait for the app to be ready")  # fmt: skip
@click.option("--no-wait", is_flag=True, help="return once the events are appended")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CA the app's HTTPS certificate chains to, for the reachability check "
                   "[default: the local up's gateway CA, else the system's]")  # fmt: skip
@json_option
@click.pass_context
def deploy_cmd(
    ctx: click.Context, compose_file: Path, env_file: str | None, ports: tuple[str, ...],
    host: str, vcpu: int, memory: int, disk: int, name: str | None, image: str, vm_id: str,
    kms_url: str | None, timeout: float, no_wait: bool, ca_file: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Deploy a docker-compose.yaml (or an app-compose.json) and follow it until it is up."""
    envs = read_env_file(env_file) if env_file else []
    names = tuple(dict.fromkeys(k for k, _ in envs))
    text = _compose_text(compose_file, name, names)
    out = _Out(as_json)
    req = DeployRequest(app_compose=text, name=name or "", env_names=names, ports=ports,
                        vcpu=vcpu, memory_mb=memory, disk_gb=max(1, disk // 1024), image=image,
                        host=host, vm_id=vm_id)  # fmt: skip
    vm = str(uuid.uuid4())
    try:
        plan = plan_deploy(req, vm_id=vm)  # checks everything before the KMS is asked
    except BadInput as exc:
        raise click.BadParameter(str(exc)) from None
    app_id, compose_hash, doc = compose_ids(text)
    out.info(f"app id       {app_id}\ncompose hash {compose_hash}", app_id=app_id,
             compose_hash=compose_hash, app_compose=text)  # fmt: skip
    conn = resolve(ctx)
    if conn.data.state().get("tee") == "simulated":  # simulation is never silent
        out.info("simulated TDX: no confidentiality (quotes signed by this host's dev PKI)",
                 tee="simulated")  # fmt: skip

    async def go() -> int:
        nonlocal plan
        async with await connect(conn) as store:
            log = await log_context(store)
            if envs:
                url = kms_url_of(conn, kms_url)
                if not url:
                    raise click.ClickException("--env-file needs a KMS: pass --kms URL (or run "
                                               "`pydstack up` with its KMS)")  # fmt: skip
                trust = await cluster_trust(conn, None, store)
                blob, root = await seal_env(url, app_id, envs, trust)
                out.info(f"env          {len(envs)} vars sealed to the app key from "
                         f"{urlsplit(url).netloc} (signed by KMS cluster {root}'s root, "
                         f"{trust.source})",
                         env_vars=list(names), kms=url, kms_root=root)  # fmt: skip
                try:
                    plan = plan_deploy(_with_env(req, blob), vm_id=vm)
                except BadInput as exc:
                    raise click.BadParameter(str(exc)) from None
            outcome, seq = await _commit(store, plan)
            out.info(f"{outcome} app {app_id}; requested vm {plan.request.vm_id} (seq {seq})",
                     app=outcome, vm_id=plan.request.vm_id, seq=seq)  # fmt: skip
            vm_ports = [p.vm_port for p in plan.request.ports]
            gateway = bool(log.base_domains()) and bool(doc.get("gateway_enabled", False))
            if no_wait:
                urls = gateway_urls(conn, log, app_id, vm_ports) if gateway else []
                out.info("\n".join(f"will be at  {u}" for u in urls) or
                         f"follow it:  pydstack events --follow --subject dstack.vm."
                         f"{plan.request.vm_id}", urls=urls)  # fmt: skip
                return 0
            w = Watch(app_id=app_id, vm_id=plan.request.vm_id, compose_hash=compose_hash,
                      gateway_expected=gateway)  # fmt: skip
            out.stage("requested", f"vm {plan.request.vm_id}", seq)
            t_end = time.monotonic() + timeout
            w = await _follow(store, w, seq, timeout, out)
            if w.failed:
                raise click.ClickException(f"deploy of app {app_id} failed: {w.failed}")
            urls = _where(conn, log, w, vm_ports, out)
            return await _reachable(conn, urls, t_end, out, ca_file)

    run(go())


def _with_env(req: DeployRequest, blob: bytes) -> DeployRequest:
    import msgspec

    return msgspec.structs.replace(req, encrypted_env=blob.hex())


async def _follow(store: EventStore, w: Watch, seq: int, timeout: float, out: _Out) -> Watch:
    try:
        async with asyncio.timeout(timeout):
            reader = cast(AsyncGenerator[Recorded, None], store.read(from_seq=seq + 1, follow=True))
            async with contextlib.aclosing(reader) as it:
                async for rec in it:
                    a = decoded(rec)
                    if a is None:
                        continue
                    w, steps = step(w, rec.subject, a)
                    for s in steps:
                        out.stage(s.stage, s.text, s.seq)
                    if w.failed or w.stage == "ready":
                        return w
    except TimeoutError:
        raise click.ClickException(
            f"deploy of app {w.app_id} timed out after {timeout:g}s at stage {w.stage}: "
            f"waiting for {waiting_for(w)}"
        ) from None
    return w


def _where(conn: Conn, log: LogContext, w: Watch, vm_ports: list[int], out: _Out) -> list[str]:
    if w.registered:
        urls = gateway_urls(conn, log, w.app_id, vm_ports, cluster=w.registered[-1][0])
        out.info("\n".join(f"url          {u}" for u in urls), urls=urls)
        return urls
    maps = [f"{p.protocol} {p.host_address}:{p.host_port} -> {p.vm_port}"
            for p in (w.vm.ports if w.vm else ())]  # fmt: skip
    why = "no gateway is up" if not log.base_domains() else "the compose has no gateway"
    out.info(f"{why}; reach the app on its host ports:\n" +
             ("\n".join(f"  {m}" for m in maps) or "  none mapped (pass --port HOST:VM)"),
             urls=[], gateway=None, ports=maps)  # fmt: skip
    return []


async def _reachable(
    conn: Conn, urls: list[str], t_end: float, out: _Out, ca_file: str | None = None
) -> int:
    """GET each URL through the gateway (up's proxy and CA for up's domain; ``ca_file``
    instead of that CA when the gateway serves ACME certificates) until it answers; a URL
    whose name does not resolve here is reported as not checked."""
    from ._reach import wait_reachable

    state = conn.data.state()
    domain, proxy = str(state.get("gateway_domain") or ""), str(state.get("gateway_proxy") or "")
    ca_path = Path(ca_file or str(state.get("gateway_ca") or ""))
    ca = await asyncio.to_thread(lambda: ca_path.read_text() if ca_path.is_file() else None)
    reachable: dict[str, str] = {}
    unchecked: dict[str, str] = {}
    for url in urls:
        host = urlsplit(url).hostname or ""
        local = bool(domain) and host.endswith(f".{domain}") and ":" in proxy
        addr = proxy.rpartition(":")
        ok, detail = await wait_reachable(
            url, deadline=max(t_end, time.monotonic() + 5),
            connect_to=(addr[0], int(addr[2])) if local else None,
            ca_pem=ca if local or ca_file else None,
        )  # fmt: skip
        if ok is False:
            raise click.ClickException(f"the app is up but {url} did not answer through the "
                                       f"gateway: {detail}")  # fmt: skip
        (reachable if ok else unchecked)[url] = detail
    if out.as_json:
        if urls:
            echo_json({"urls": urls, "reachable": reachable, "unchecked": unchecked})
        return 0
    for url, detail in reachable.items():
        click.echo(f"reachable    {url} ({detail} through the gateway)")
    for url, detail in unchecked.items():
        click.echo(f"not checked  {url}: {detail}")
    return 0
