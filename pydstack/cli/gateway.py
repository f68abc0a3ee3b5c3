"""``pydstack gateway``: the cluster as the log says, and as each node serves it.

    pydstack gateway status [--json]                 # nodes (WireGuard backend), digests; live
    pydstack gateway routes --json                   # the table folded from the log
    pydstack gateway routes --json --node-url URL    # the table that node serves right now
    pydstack gateway peers [--node-url URL]          # desired peers, or a device's peers
    pydstack gateway add-domain example.com --acme-directory URL --dns-provider NAME

Without ``--node-url`` the answer is a fold of the log (the same on every machine); with it,
the node's admin endpoint answers (``pydstack up`` records its own node's URL, used by
``status``). ``routes --json`` prints content only (no sequence), so two nodes serving the
same table print the same bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp
import click
import msgspec

from pydstack.core.gateway.table import ClusterTable

if TYPE_CHECKING:
    from pydstack.actors.gateway.view import ClusterView

from ._common import Settings, connect, connection_options, echo_json, resolve, run


async def _get(url: str) -> Any:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            async with s.get(url) as resp:
                resp.raise_for_status()
                return await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise click.ClickException(f"gateway node at {url}: {exc or type(exc).__name__}") from None


async def _folded(ctx: click.Context, cluster: str) -> ClusterTable:
    return (await _view(ctx, cluster)).table()


async def _view(ctx: click.Context, cluster: str) -> ClusterView:
    from pydstack.actors.gateway.view import ClusterView

    async with await connect(resolve(ctx)) as store:
        view = ClusterView(store, cluster)
        await view.catch_up()
        return view


def _nodes_doc(view: ClusterView) -> list[dict[str, Any]]:
    """The table's nodes, each with the WireGuard backend it joined with (the log's
    GatewayNodeJoined; "" for nodes that joined before it was recorded)."""
    joined = view.state.nodes
    return [
        {**msgspec.to_builtins(g), "wg_backend": joined[g.node_id].wg_backend,
         "wg_backend_reason": joined[g.node_id].wg_backend_reason}
        for g in view.table().gateways
    ]  # fmt: skip


async def _table(ctx: click.Context, cluster: str, node_url: str | None) -> ClusterTable:
    if node_url:
        return msgspec.convert(await _get(node_url.rstrip("/") + "/table"), ClusterTable)
    return await _folded(ctx, cluster)


def _routes_doc(t: ClusterTable) -> dict[str, Any]:
    return {
        "cluster": t.cluster,
        "digest": t.digest(),
        "base_domains": list(t.base_domains),
        "routes": msgspec.to_builtins(t.routes),
        "apps": msgspec.to_builtins(t.apps),
    }


cluster_option = click.option("--cluster", default="default", show_default=True)
node_option = click.option(
    "--node-url", default=None, metavar="URL", help="a node's admin endpoint (live answer)"
)
json_flag = click.option("--json", "as_json", is_flag=True, help="JSON output")


@click.group()
@connection_options
def gateway() -> None:
    """Gateway cluster: nodes, routes, WireGuard peers, domains."""


@gateway.command()
@connection_options
@cluster_option
@node_option
@json_flag
@click.pass_context
def status(ctx: click.Context, cluster: str, node_url: str | None, as_json: bool) -> None:
    """Nodes on the log, the table digest, and live status of the nodes we can reach."""

    async def go() -> dict[str, Any]:
        view = await _view(ctx, cluster)
        t = view.table()
        urls = [node_url] if node_url else []
        own = resolve(ctx).data.state().get("gateway_admin_url")
        if not urls and own:
            urls = [own]
        live = [await _get(u.rstrip("/") + "/status") for u in urls]
        return {
            "cluster": t.cluster, "seq": t.seq, "table_digest": t.digest(),
            "peers": len(t.peers), "routes": len(t.routes), "base_domains": list(t.base_domains),
            "nodes": _nodes_doc(view), "live": live,
        }  # fmt: skip

    doc = run(go())
    if as_json:
        echo_json(doc)
        return
    click.echo(f"cluster {doc['cluster']}: {doc['routes']} routes, {doc['peers']} peers, "
               f"table {doc['table_digest'][:16]} at seq {doc['seq']}")  # fmt: skip
    for n in doc["nodes"]:
        click.echo(f"  node {n['node_id']:<12} {'up' if n['up'] else 'DOWN':<5} "
                   f"{n['tunnel_ip']:<15} {n['endpoint']:<22} {n['base_domain']}  "
                   f"wireguard {n['wg_backend'] or '?'}")  # fmt: skip
    for s in doc["live"]:
        same = "same table" if s["table_digest"] == doc["table_digest"] else "DIFFERENT table"
        click.echo(f"  live {s['node_id']}: {same}, lag {s['lag']}, "
                   f"{'connected' if s['connected'] else 'CUT OFF'}, "
                   f"device {'in sync' if s['in_sync'] else 'NOT in sync'}")  # fmt: skip
        if s.get("wg_backend"):  # a node older than the field does not say
            click.echo(f"    wireguard {s['wg_backend']}: {s['wg_backend_reason']}")


@gateway.command()
@connection_options
@cluster_option
@node_option
@json_flag
@click.pass_context
def routes(ctx: click.Context, cluster: str, node_url: str | None, as_json: bool) -> None:
    """The routing table (instances, apps, base domains)."""
    t = run(_table(ctx, cluster, node_url))
    if as_json:
        echo_json(_routes_doc(t))
        return
    click.echo(f"table {t.digest()[:16]}; base domains: {', '.join(t.base_domains) or '-'}")
    for r in t.routes:
        ports = ",".join(str(p.port) for p in r.port_policy.ports) or "*"
        mode = "restrict" if r.port_policy.restrict else "open"
        click.echo(f"  {r.instance_id}  app {r.app_id}  {r.tunnel_ip:<15} {mode} {ports}")


@gateway.command()
@connection_options
@cluster_option
@node_option
@json_flag
@click.pass_context
def peers(ctx: click.Context, cluster: str, node_url: str | None, as_json: bool) -> None:
    """WireGuard peers: the table's (from the log) or a node device's (``--node-url``)."""

    async def go() -> list[dict[str, Any]]:
        if node_url:
            out: list[dict[str, Any]] = (await _get(node_url.rstrip("/") + "/peers"))["peers"]
            return out
        t = await _folded(ctx, cluster)
        return [{"public_key": p.public_key, "allowed_ips": [p.allowed_ip]} for p in t.peers]

    rows = run(go())
    if as_json:
        echo_json(rows)
        return
    for p in rows:
        seen = p.get("last_handshake")
        click.echo(f"  {p['public_key']}  {','.join(p['allowed_ips'])}"
                   + (f"  handshake {seen:.0f}" if seen else ""))  # fmt: skip


@gateway.command("add-domain")
@connection_options
@cluster_option
@click.argument("domain")
@click.option("--acme-directory", required=True, metavar="URL")
@click.option("--dns-provider", default="", help="name of a DNS provider the nodes have")
@click.option("--contact", multiple=True, help="ACME account contact (mailto:…)")
@click.option("--no-wildcard", is_flag=True, help="certificate for DOMAIN only, not *.DOMAIN")
@click.pass_context
def add_domain_cmd(
    ctx: click.Context, cluster: str, domain: str, acme_directory: str, dns_provider: str,
    contact: tuple[str, ...], no_wildcard: bool,
) -> None:  # fmt: skip
    """Add a base domain; the nodes' certificate keepers order its wildcard certificate."""
    from pydstack.actors.gateway.certs import add_domain
    from pydstack.core.gateway.certs import AddDomain

    s = ctx.ensure_object(Settings)
    if not s.identity and not s.creds:
        s.identity = "gateway"  # operators may not write gateway subjects; up made this one
    cmd = AddDomain(domain=domain, acme_directory=acme_directory, contact=contact,
                    dns_provider=dns_provider, wildcard=not no_wildcard)  # fmt: skip

    async def go() -> None:
        async with await connect(resolve(ctx)) as store:
            event = await add_domain(store, cluster, cmd)
        click.echo(f"domain {event.domain} added to cluster {cluster}")

    try:
        run(go())
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
