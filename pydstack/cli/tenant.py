"""``pydstack tenant add NAME``: a tenant's own identity, bound on the log's keyring by admin.

A tenant writes app and VM commands like the operator, under the app owner rule: the key that
signs an app's first ``AppRegistered`` owns the app, and only that key or admin may upgrade or
remove it afterwards; a tenant requests and commands only VMs of its own apps. Usage::

    pydstack tenant add alice                      # DATA/identities/alice.nk (0600)
    pydstack tenant add alice --out alice.creds    # and a copy for alice's machine
    pydstack tenant add alice --dashboard          # and a dashboard login as alice
    pydstack tenant keygen alice.nk                # on alice's machine: prints U...
    pydstack tenant add alice --public-nkey U...          # bind it: its seed never on this host
    pydstack --as alice deploy compose.yaml        # on this machine
    pydstack --creds alice.creds --nats URL app upgrade APP compose.yaml   # on alice's

It needs this data dir's admin identity (the first host's). The NATS server an ``up`` runs
takes its users from the log's keyring, so the key can log in at once (a cluster you run
yourself: ``pydstack host nats-config``); its NATS permissions are the operator's subjects
(``core.policy.ROLES``), the owner rule is enforced by every fold.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path
from typing import Any

import click
import nkeys

from pydstack.adapters.nats import EventStore, StoreError
from pydstack.adapters.nats.identity import Identity
from pydstack.adapters.secretfile import write_secret
from pydstack.core.policy import NAME, TENANT

from ._common import Conn, connect, connection_options, echo_json, json_option, resolve, run


@click.group("tenant")
def tenant() -> None:
    """Tenants: identities that own the apps they register."""


def _admin_conn(conn: Conn) -> Conn:
    admin = conn.data.identities.load("admin")
    if admin is None:
        raise StoreError(
            f"no admin identity in {conn.data.identities.dir}: run this on the first host "
            "(the data dir of the `pydstack up` that created the keyring)"
        )
    return Conn(conn.url, admin.signer, admin.seed, conn.stream, conn.data)


def _creds_text(ident: Identity, conn: Conn) -> str:
    anchor = conn.anchor
    return (
        f"# pydstack tenant {ident.name}: its nkey seed signs its events and logs in to NATS.\n"
        f"# use: pydstack --creds THIS_FILE --nats {conn.url} --stream {conn.stream} ...\n"
        f"# public nkey {ident.nkey}\n"
        f"# the cluster's admin key (the keyring's anchor): {anchor.hex() if anchor else '?'}\n"
        f"{ident.seed}\n"
    )


@tenant.command("add")
@connection_options
@click.argument("name")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="also write a creds file for the tenant's machine (0600, never overwritten)",
)
@click.option(
    "--dashboard",
    is_flag=True,
    help="also a dashboard login token for it (DATA/dashboard/tenants/NAME.token, "
    "0600): who logs in with it writes as this tenant",
)
@click.option(
    "--public-nkey",
    "public",
    metavar="U...",
    default=None,
    help="bind the tenant's own public nkey (`pydstack tenant keygen` on its machine): "
    "no seed is made here, so this host's operator can never sign as the tenant",
)
@json_option
@click.pass_context
def tenant_add(
    ctx: click.Context, name: str, out: Path | None, dashboard: bool, public: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Mint a tenant's key (or take its public nkey) and bind it on the log's keyring."""
    conn = resolve(ctx)
    admin = _admin_conn(conn)
    ids = conn.data.identities
    found = ids.load(name)
    if found is not None and found.role != TENANT:
        raise click.ClickException(f"{name!r} is already the {found.role} identity; pick another")
    ident: Identity | None = None
    if public is not None:
        if out is not None or dashboard:
            raise click.UsageError("--public-nkey binds a key whose seed stays with the tenant: "
                                   "no --out or --dashboard (they need the seed here)")  # fmt: skip
        key, nkey = _public_key(public), public.strip()
    else:
        ident = ids.ensure(name, TENANT)
        key, nkey = ident.key, ident.nkey

    async def go() -> dict[str, Any]:
        from pydstack.actors.trust import ensure_keyring

        store: EventStore
        async with await connect(admin) as store:
            added = await ensure_keyring(store, [(key, name, TENANT, ())])
            if not added:  # already bound, or this admin key is not the keyring's admin
                ring_ok = key in await _bound_keys(store)
                if not ring_ok:
                    raise StoreError(f"could not bind {name!r} on the log's keyring: this "
                                     "data dir's admin is not the keyring's admin")  # fmt: skip
            return {"name": name, "role": TENANT, "key": key.hex(), "nkey": nkey,
                    "seed_file": str(ids.path(name)) if ident else None,
                    "bound": bool(added)}  # fmt: skip

    r = run(go())
    if ident is None:
        if as_json:
            echo_json(r)
        else:
            state = "bound on" if r["bound"] else "already on"
            click.echo(f"tenant {name}: its key {nkey} {state} the log's keyring (its seed "
                       "stays on its machine: pydstack --creds SEED_FILE ...)")  # fmt: skip
        return
    if out is not None:
        try:
            write_secret(out, _creds_text(ident, conn), overwrite=False)
        except FileExistsError:
            raise click.ClickException(f"{out} exists; not overwriting a creds file") from None
        r["creds_file"] = str(out)
    if dashboard:
        token_file = conn.data.path / "dashboard" / "tenants" / f"{name}.token"
        if not token_file.exists():
            write_secret(token_file, secrets.token_urlsafe(32) + "\n", overwrite=False)
        r["dashboard_token_file"] = str(token_file)
    if as_json:
        echo_json(r)
        return
    state = "bound on the log's keyring" if r["bound"] else "already on the log's keyring"
    click.echo(f"tenant {name}: key {ident.nkey} {state}; seed in {r['seed_file']} (0600)")
    if out is not None:
        click.echo(f"creds for {name}'s machine: {out} (0600; holds the seed: move it privately)")
    click.echo(f"use it here with: pydstack --as {name} ...")
    if dashboard:
        click.echo(f"dashboard login as {name}: the token in {r['dashboard_token_file']} "
                   "(Authorization: Bearer TOKEN, or open /?token=TOKEN once)")  # fmt: skip


@tenant.command("keygen")
@click.argument("seed_file", type=click.Path(dir_okay=False, path_type=Path))
def tenant_keygen(seed_file: Path) -> None:
    """Make a tenant key on the tenant's own machine: the seed in SEED_FILE (0600, never
    overwritten); prints the public nkey for the admin's `tenant add NAME --public-nkey U...`."""
    ident = Identity.generate(seed_file.stem if NAME.match(seed_file.stem) else "tenant", TENANT)
    try:
        write_secret(seed_file, ident.seed + "\n", overwrite=False)
    except FileExistsError:
        raise click.ClickException(f"{seed_file} exists; not overwriting a seed") from None
    click.echo(ident.nkey)


def _public_key(nkey: str) -> bytes:
    """The Ed25519 key inside a public user nkey (``U...``), its checksum checked."""
    text = nkey.strip()
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except ValueError:
        raw = b""
    if len(raw) != 35 or raw[0] != nkeys.PREFIX_BYTE_USER or \
            int.from_bytes(raw[33:], "little") != nkeys.crc16(bytearray(raw[:33])):  # fmt: skip
        # Never echo a seed (S...) given here by mistake: the terminal's scrollback keeps it.
        shown = "a seed, not a public key" if text.startswith("S") else repr(text[:60])
        raise click.BadParameter(f"{shown} is not a public user nkey (U...)",
                                 param_hint="--public-nkey")  # fmt: skip
    return bytes(raw[1:33])


async def _bound_keys(store: EventStore) -> set[bytes]:
    from pydstack.actors.trust import Judge
    from pydstack.core.policy import KEYRING_SUBJECT

    records, _ = await store.read_aggregate(KEYRING_SUBJECT)
    judge = Judge("keyring", store.anchor)
    judge.learn(records)
    return {k for k, b in judge.gate.keyring.names().items() if not b.revoked}
