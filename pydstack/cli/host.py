"""`pydstack host …` (admin): give a further host keys of its own, or take them back.

pydstack host add h2 --gateway --out h2.bundle --nats-url nats://10.0.0.1:4222
scp h2.bundle h2: && ssh h2 pydstack up --join h2.bundle --vmm sandbox
pydstack host remove h2
pydstack host nats-config > users.json   # a NATS cluster `up` does not run
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ._common import Conn, Settings, connect, resolve, run


@click.group("host")
def host() -> None:
    """Per-host identities (admin): add a host (its keys and join bundle), remove it."""


def _admin(ctx: click.Context) -> Conn:
    s = ctx.ensure_object(Settings)
    if not s.identity and not s.creds:
        s.identity = "admin"  # only admin may change the keyring
    return resolve(ctx)


@host.command("add")
@click.argument("name")
@click.option("--gateway", is_flag=True, help="also a key for the host's gateway node")
@click.option("--kms", is_flag=True, help="also a key for a KMS replica on the host")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="where to write the join bundle (0600) [default: NAME.bundle]")  # fmt: skip
@click.option("--nats-url", "nats_urls", multiple=True, metavar="URL",
              help="NATS URL the host reaches the cluster at [default: this CLI's]")  # fmt: skip
@click.option("--kms-url", "kms_urls", multiple=True, metavar="URL",
              help="KMS URL the host's CVMs ask [default: the local up's KMS]")  # fmt: skip
@click.pass_context
def add(
    ctx: click.Context,
    name: str,
    gateway: bool,
    kms: bool,
    out: str | None,
    nats_urls: tuple[str, ...],
    kms_urls: tuple[str, ...],
) -> None:
    """Mint host NAME's own keys, bind them on the keyring, write its join bundle.

    The bundle holds only NAME's seeds (its VMM key, bound to NAME; with --gateway its
    gateway node's key, with --kms its KMS replica's) and the cluster's public data.
    Servers `up` runs admit the new keys at once (they follow the keyring); other NATS
    servers: see `host nats-config`."""
    conn = _admin(ctx)
    path = Path(out or f"{name}.bundle")
    if path.exists():
        raise click.ClickException(f"{path} exists; remove it or choose another --out")
    run(_add(conn, name, (gateway, kms), path, nats_urls, kms_urls))
    click.echo(f"host {name}: keys bound on the keyring; join bundle {path} (0600)")
    click.echo(f"on {name}: pydstack up --join {path} [--vmm sandbox|qemu]")


async def _add(
    conn: Conn,
    name: str,
    roles: tuple[bool, bool],
    path: Path,
    nats_urls: tuple[str, ...],
    kms_urls: tuple[str, ...],
) -> None:
    from pydstack.actors.hosts import add_host
    from pydstack.adapters.nats.bundle import JoinBundle, write_bundle

    anchor = conn.anchor
    if anchor is None or conn.signer.public_key != anchor:
        raise click.ClickException(
            f"`host add` signs as the cluster's admin: {conn.data.identities.dir} has no admin key"
        )
    async with await connect(conn) as admin:
        ids = await add_host(admin, name, gateway=roles[0], kms=roles[1])
    public = json.loads(conn.keyring_path.read_text())["identities"]
    public += [
        {"name": i.name, "role": i.role, "nkey": i.nkey, "key": i.key.hex(),
         "subjects": list(i.subjects)} for i in ids
    ]  # fmt: skip
    state = conn.data.state()
    pki = conn.data.path / "dev-pki" / "root.der"
    bundle = JoinBundle(
        host=name,
        seeds={i.name: (i.role, i.seed) for i in ids},
        nats_urls=nats_urls or tuple(u.strip() for u in conn.url.split(",")),
        stream=conn.stream,
        anchor=anchor,
        keyring=public,
        kms_urls=kms_urls or tuple(u for u in [state.get("kms_url")] if u),
        dev_pki_root=pki.read_bytes() if pki.exists() else b"",
    )
    write_bundle(path, bundle)


@host.command("remove")
@click.argument("name")
@click.pass_context
def remove(ctx: click.Context, name: str) -> None:
    """Revoke host NAME's keys: every fold refuses what they sign from now on (their past
    events stay valid) and servers `up` runs log them out."""
    conn = _admin(ctx)

    async def go() -> int:
        from pydstack.actors.hosts import remove_host

        async with await connect(conn) as admin:
            return len(await remove_host(admin, name))

    n = run(go())
    click.echo(f"host {name}: {n} key(s) revoked")


@host.command("nats-config")
@click.pass_context
def nats_config(ctx: click.Context) -> None:
    """The `authorization` block of a nats-server config admitting exactly the keyring's keys
    (for NATS servers `up` does not run: put it in each node's config, then
    `nats-server --signal reload`)."""
    conn = resolve(ctx)

    async def go() -> str:
        from pydstack.actors.hosts import read_keyring
        from pydstack.adapters.nats import NatsServerConfig
        from pydstack.adapters.nats.identity import nats_users

        async with await connect(conn) as store:
            ring, _ = await read_keyring(store)
        users = nats_users(ring, (), conn.stream)
        conf = json.loads(NatsServerConfig(data_dir=Path("."), users=users).render())
        return json.dumps({"authorization": conf["authorization"]}, indent=2)

    click.echo(run(go()))
