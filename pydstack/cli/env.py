"""`pydstack env encrypt`: encrypt a .env file for an app, as dstack-sdk's encrypt_env_vars does.

    pydstack env encrypt --app-id 5bb4…6c56 --kms https://kms:9100 \
        --kms-root 03ab…  .env  > app.env.enc.hex

The app's X25519 public key comes from the KMS (`GetAppEnvEncryptPubKey`) and is accepted
only when its timestamped signature recovers the pinned KMS root key (`--kms-root`, else the
`KmsRootCreated` public key given by `--expect-root-from-meta` from GetMeta, with a warning).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import click

from pydstack.core.kms.derive import DerivationError, EnvPubKey, env_pubkey_signer
from pydstack.core.kms.envcrypt import EnvFileError, encrypt_env, parse_env_file

MAX_AGE = 300


async def fetch_env_pubkey(
    kms_url: str, app_id: bytes, ca_pem: str | None
) -> tuple[EnvPubKey, str]:
    """(the signed env public key, the KMS root k256 public key GetMeta reports)."""
    from pydstack.actors.kms.client import KmsClient

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


@click.group("env")
def env() -> None:
    """Encrypted environment variables for apps (dstack format)."""


@env.command("encrypt")
@click.option("--app-id", required=True, help="app id, 20 bytes hex")
@click.option("--kms", "kms_url", required=True, envvar="PYDSTACK_KMS", help="KMS base URL")
@click.option("--kms-root", default=None, help="pinned KMS root k256 public key (hex)")
@click.option("--kms-ca", type=click.Path(exists=True, dir_okay=False), default=None,
              help="KMS CA certificate (PEM) to check the server with")  # fmt: skip
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="write raw bytes here (default: hex on stdout)")  # fmt: skip
@click.argument("env_file", type=click.Path(exists=True, dir_okay=False))
def encrypt(
    app_id: str, kms_url: str, kms_root: str | None, kms_ca: str | None, output: str | None,
    env_file: str,
) -> None:  # fmt: skip
    """Encrypt ENV_FILE (KEY=VALUE lines) to the app's KMS-derived env key."""
    try:
        aid = bytes.fromhex(app_id.removeprefix("0x"))
        envs = parse_env_file(Path(env_file).read_text())
    except (ValueError, EnvFileError) as e:
        raise click.ClickException(str(e)) from None
    if len(aid) != 20:
        raise click.ClickException("--app-id must be 20 bytes of hex")
    ca_pem = Path(kms_ca).read_text() if kms_ca else None
    pub, meta_root = asyncio.run(fetch_env_pubkey(kms_url, aid, ca_pem))
    if kms_root is None:
        click.echo(
            f"warning: no --kms-root pinned; trusting the root the KMS reports ({meta_root})",
            err=True,
        )
    root = bytes.fromhex((kms_root or meta_root).removeprefix("0x"))
    check_env_pubkey(pub, aid, root, int(time.time()))
    blob = encrypt_env(envs, pub.public_key, ephemeral=os.urandom(32), iv=os.urandom(12))
    if output:
        Path(output).write_bytes(blob)
    else:
        sys.stdout.write(blob.hex() + "\n")
