"""`pydstack env encrypt`: encrypt a .env file for an app, as dstack-sdk's encrypt_env_vars does.

    pydstack env encrypt --app-id 5bb4…6c56 .env > app.env.enc.hex      # next to `pydstack up`
    pydstack env encrypt --app-id 5bb4…6c56 --kms https://kms:9100 --kms-root 03ab… .env

The app's X25519 public key comes from the KMS (`GetAppEnvEncryptPubKey`; default: the local
`pydstack up`'s KMS) and is accepted only when its timestamped signature recovers a trusted
KMS root key: the one pinned with `--kms-root`, else a `KmsRootCreated` root on the log (the
local `up`'s, or `--nats`), else (no log reachable) the root the KMS itself reports in GetMeta,
with a warning.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import click

from pydstack.core.kms.derive import DerivationError, EnvPubKey, env_pubkey_signer
from pydstack.core.kms.envcrypt import EnvFileError, encrypt_env, parse_env_file

from ._apps import kms_url_of, read_events
from ._common import Conn, connect, connection_options, resolve

MAX_AGE = 300


async def fetch_env_pubkey(
    kms_url: str, app_id: bytes, ca_pem: str | None
) -> tuple[EnvPubKey, str]:
    """(the signed env public key, the KMS root k256 public key GetMeta reports); a KMS that
    cannot be reached or answers nonsense is a ClickException naming it."""
    import aiohttp

    from pydstack.actors.kms.client import KmsCallError, KmsClient

    try:
        async with KmsClient(kms_url, ca_pem=ca_pem) as kms:
            resp = await kms.call("GetAppEnvEncryptPubKey", {"app_id": app_id.hex()})
            meta = await kms.call("GetMeta")
        pub = EnvPubKey(
            public_key=bytes.fromhex(resp["public_key"]),
            signature=bytes.fromhex(resp["signature"]),
            timestamp=int(resp["timestamp"]),
            signature_v1=bytes.fromhex(resp["signature_v1"]),
        )
        return pub, str(meta["k256_pubkey"])
    except (KmsCallError, aiohttp.ClientError, OSError, TimeoutError, KeyError, ValueError) as e:
        raise click.ClickException(
            f"KMS {kms_url}: {type(e).__name__}: {e}; is it running (`pydstack up`), or pass --kms"
        ) from None


def check_env_pubkey(pub: EnvPubKey, app_id: bytes, root: bytes, now: int) -> None:
    """Raise ClickException unless `pub` is fresh and signed by `root`."""
    if not -60 <= now - pub.timestamp <= MAX_AGE:
        raise click.ClickException(f"KMS signature timestamp {pub.timestamp} is not fresh")
    try:
        signer = env_pubkey_signer(pub, app_id)
    except DerivationError as e:
        raise click.ClickException(f"KMS env key signature: {e}") from None
    if signer != root:
        raise click.ClickException(
            f"env key signed by {signer.hex()}, not the pinned KMS root {root.hex()}"
        )


def trusted_root(pub: EnvPubKey, app_id: bytes, roots: Mapping[str, bytes], kms_url: str) -> str:
    """The name of the first of `roots` (by name) that signed `pub`, fresh; else a
    ClickException naming every refusal."""
    now, errors = int(time.time()), []
    for name, root in sorted(roots.items()):
        try:
            check_env_pubkey(pub, app_id, root, now)
        except click.ClickException as e:
            errors.append(e.message)
            continue
        return name
    raise click.ClickException(f"refusing the env key from {kms_url}: {'; '.join(errors)}")


@click.group("env")
def env() -> None:
    """Encrypted environment variables for apps (dstack format)."""


@env.command("encrypt")
@connection_options
@click.option("--app-id", required=True, help="app id, 20 bytes hex")
@click.option("--kms", "kms_url", default=None, envvar="PYDSTACK_KMS",
              help="KMS base URL [default: the local `pydstack up`'s KMS]")  # fmt: skip
@click.option("--kms-root", default=None,
              help="pinned KMS root k256 key (hex) [default: the roots on the log]")  # fmt: skip
@click.option("--kms-ca", type=click.Path(exists=True, dir_okay=False), default=None,
              help="KMS CA certificate (PEM) to check the server with")  # fmt: skip
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="write raw bytes here (default: hex on stdout)")  # fmt: skip
@click.argument("env_file", type=click.Path(exists=True, dir_okay=False))
@click.pass_context
def encrypt(
    ctx: click.Context, app_id: str, kms_url: str | None, kms_root: str | None,
    kms_ca: str | None, output: str | None, env_file: str,
) -> None:  # fmt: skip
    """Encrypt ENV_FILE (KEY=VALUE lines) to the app's KMS-derived env key."""
    try:
        aid = bytes.fromhex(app_id.removeprefix("0x"))
        envs = parse_env_file(Path(env_file).read_text())
        pinned = bytes.fromhex(kms_root.removeprefix("0x")) if kms_root else None
    except (ValueError, EnvFileError) as e:
        raise click.ClickException(str(e)) from None
    if len(aid) != 20:
        raise click.ClickException("--app-id must be 20 bytes of hex")
    conn = resolve(ctx)
    url = kms_url_of(conn, kms_url)
    if not url:
        raise click.ClickException(
            "no KMS to ask: pass --kms URL, or run next to a `pydstack up` with its KMS "
            "(or --data-dir of one)"
        )
    ca_pem = Path(kms_ca).read_text() if kms_ca else None
    pub, meta_root = asyncio.run(fetch_env_pubkey(url, aid, ca_pem))
    roots = {"pinned": pinned} if pinned is not None else asyncio.run(_log_roots(conn))
    if not roots:
        click.echo(
            f"warning: no --kms-root pinned and no KMS root on a reachable log; trusting the "
            f"root the KMS reports ({meta_root})",
            err=True,
        )
        roots = {"reported": bytes.fromhex(meta_root.removeprefix("0x"))}
    trusted_root(pub, aid, roots, url)
    blob = encrypt_env(envs, pub.public_key, ephemeral=os.urandom(32), iv=os.urandom(12))
    if output:
        Path(output).write_bytes(blob)
    else:
        sys.stdout.write(blob.hex() + "\n")


async def _log_roots(conn: Conn) -> dict[str, bytes]:
    """The k256 root of every KMS cluster on the log; none when no log is reachable."""
    from pydstack.adapters.nats import StoreError
    from pydstack.core.events import KmsRootCreated

    try:
        async with await connect(conn) as store:
            found = await read_events(store, "dstack.kms.*")
    except StoreError:
        return {}
    roots = (a.event for _, a in found if isinstance(a.event, KmsRootCreated))
    return {r.cluster: r.k256_public_key for r in roots}
