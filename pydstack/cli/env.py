"""`pydstack env encrypt`: encrypt a .env file for an app, as dstack-sdk's encrypt_env_vars does.

    pydstack env encrypt --app-id 5bb4…6c56 .env > app.env.enc.hex      # next to `pydstack up`
    pydstack env encrypt --app-id 5bb4…6c56 --kms https://kms:9100 --kms-root 03ab… .env

The app's X25519 public key comes from the KMS (`GetAppEnvEncryptPubKey`; default: the local
`pydstack up`'s KMS) and is accepted only when its timestamped signature recovers the root of
one KMS cluster, pinned by its id: the root given with `--kms-root`, else the root of cluster
`--kms-cluster` (default: the data dir's, else `main`) as the data dir records it
(`DATA_DIR/kms/cluster.json`, written by `up`) and the log holds it (`KmsRootCreated` on
`dstack.kms.<cluster>`). A root of another cluster on the same log is refused, naming both.
Only when neither is there (no log reachable) is the root the KMS reports in GetMeta taken,
with a warning.

The connection is checked as well: TLS to the cluster's KMS CA (recorded, on the log, or
`--kms-ca`); with none, the server must prove it is an attested KMS (RA-TLS evidence and the
`kms:rpc` usage), under the data dir's dev PKI when it has one (simulated TDX: said so), else
under Intel's root.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pydstack.core.kms.derive import DerivationError, EnvPubKey, env_pubkey_signer
from pydstack.core.kms.envcrypt import EnvFileError, encrypt_env, parse_env_file

from ._apps import kms_url_of, read_events
from ._common import Conn, connect, connection_options, resolve

if TYPE_CHECKING:
    from pydstack.adapters.nats import EventStore
    from pydstack.adapters.tdx.pki import DevPki
    from pydstack.core.events import KmsRootCreated

MAX_AGE = 300
PINNED = "pinned"  # the name of a root given with --kms-root


@dataclass(frozen=True)
class ClusterTrust:
    """The KMS cluster an env key must come from, and what vouches for it."""

    cluster: str
    root: bytes | None = None  # its root k256 public key; None: known neither here nor on a log
    ca_pem: str | None = None  # its KMS CA, which TLS to any of its replicas chains to
    source: str = ""  # where the root came from, for messages
    reachable: bool = True  # whether a log could be read


async def cluster_trust(conn: Conn, cluster: str | None, store: EventStore | None) -> ClusterTrust:
    """The pinned cluster: `cluster` (default: the data dir's, else main), its root as the data
    dir records it and the log (`store`, else the data dir's) holds it. A record and a log that
    disagree are a ClickException naming both roots."""
    from pydstack.actors.kms.pin import DEFAULT_CLUSTER, PIN_FILE, PinError, read_pin

    try:
        pin = read_pin(conn.data.path)
    except PinError as exc:
        raise click.ClickException(str(exc)) from None
    name = cluster or (pin.cluster if pin else DEFAULT_CLUSTER)
    reachable, created = await _log_root(conn, name, store)
    if pin is not None and pin.cluster == name:
        where = str(conn.data.path / PIN_FILE)
        if created is not None and created.k256_public_key.hex() != pin.k256_root:
            raise click.ClickException(
                f"KMS cluster {name}: this data dir records root {pin.k256_root} ({where}), "
                f"the log holds {created.k256_public_key.hex()}: not the log of this cluster"
            )
        root = bytes.fromhex(pin.k256_root)
        return ClusterTrust(name, root, pin.ca_cert_pem or None, where, reachable)
    if created is None:
        return ClusterTrust(name, reachable=reachable)
    return ClusterTrust(name, created.k256_public_key, created.ca_cert_pem or None, "the log")


async def _log_root(
    conn: Conn, cluster: str, store: EventStore | None
) -> tuple[bool, KmsRootCreated | None]:
    """(a log was reachable, the cluster's root on it as its KMS folds it)."""
    from pydstack.actors.kms.pin import cluster_root
    from pydstack.adapters.nats import StoreError

    if store is not None:
        return True, await cluster_root(store, cluster)
    try:
        async with await connect(conn) as s:
            return True, await cluster_root(s, cluster)
    except StoreError:
        return False, None


async def clusters_on_log(store: EventStore) -> list[str]:
    """Every cluster with a root on the log (for messages)."""
    from pydstack.core.events import KmsRootCreated

    found = await read_events(store, "dstack.kms.*")
    return sorted({a.event.cluster for _, a in found if isinstance(a.event, KmsRootCreated)})


async def fetch_env_pubkey(
    kms_url: str, app_id: bytes, ca_pem: str | None, *, dev_pki: DevPki | None = None
) -> tuple[EnvPubKey, str]:
    """(the signed env public key, the KMS root k256 public key GetMeta reports). Without
    `ca_pem` the server must be an attested KMS (under `dev_pki` when simulated). A KMS that
    cannot be reached, is refused or answers nonsense is a ClickException naming it."""
    import aiohttp

    from pydstack.actors.kms.client import KmsCallError, KmsClient
    from pydstack.adapters.tdx.ratls_tls import RaTlsPeerRefused

    try:
        async with KmsClient(kms_url, ca_pem=ca_pem, dev_pki=dev_pki) as kms:
            resp = await kms.call("GetAppEnvEncryptPubKey", {"app_id": app_id.hex()})
            meta = await kms.call("GetMeta")
        pub = EnvPubKey(
            public_key=bytes.fromhex(resp["public_key"]),
            signature=bytes.fromhex(resp["signature"]),
            timestamp=int(resp["timestamp"]),
            signature_v1=bytes.fromhex(resp["signature_v1"]),
        )
        return pub, str(meta["k256_pubkey"])
    except RaTlsPeerRefused as e:
        raise click.ClickException(
            f"KMS {kms_url} is not an attested KMS: {e}; pin its CA with --kms-ca"
        ) from None
    except aiohttp.ClientSSLError as e:
        raise click.ClickException(
            f"KMS {kms_url} does not serve a certificate of the pinned KMS CA: {e}"
        ) from None
    except (KmsCallError, aiohttp.ClientError, OSError, TimeoutError, KeyError, ValueError) as e:
        raise click.ClickException(
            f"KMS {kms_url}: {type(e).__name__}: {e}; is it running (`pydstack up`), or pass --kms"
        ) from None


def check_env_pubkey(
    pub: EnvPubKey, app_id: bytes, root: bytes, now: int, whose: str = "the pinned KMS root"
) -> None:
    """Raise ClickException unless `pub` is fresh and signed by `root` (`whose` names it)."""
    if not -60 <= now - pub.timestamp <= MAX_AGE:
        raise click.ClickException(f"KMS signature timestamp {pub.timestamp} is not fresh")
    try:
        signer = env_pubkey_signer(pub, app_id)
    except DerivationError as e:
        raise click.ClickException(f"KMS env key signature: {e}") from None
    if signer != root:
        raise click.ClickException(f"env key signed by {signer.hex()}, not {whose} {root.hex()}")


def trusted_root(pub: EnvPubKey, app_id: bytes, roots: Mapping[str, bytes], kms_url: str) -> str:
    """The name of the first of `roots` (by name: PINNED, or a cluster id) that signed `pub`,
    fresh; else a ClickException naming every refusal."""
    now, errors = int(time.time()), []
    for name, root in sorted(roots.items()):
        whose = "the pinned KMS root" if name == PINNED else f"KMS cluster {name}'s root"
        try:
            check_env_pubkey(pub, app_id, root, now, whose)
        except click.ClickException as e:
            errors.append(e.message)
            continue
        return name
    raise click.ClickException(f"refusing the env key from {kms_url}: {'; '.join(errors)}")


def dev_pki_of(conn: Conn, given: str | None) -> tuple[DevPki | None, Path]:
    """The dev PKI a simulated KMS's RA-TLS evidence is checked under, and its directory:
    `given`, else the data dir's (a simulated `up` makes one); None: Intel's root."""
    from pydstack.adapters.tdx.pki import DevPki

    path = Path(given) if given else conn.data.path / "dev-pki"
    if not (path / "root.der").exists():
        if given:
            raise click.BadParameter(f"{given} holds no dev PKI", param_hint="--kms-dev-pki")
        return None, path
    return DevPki.load(path), path


@click.group("env")
def env() -> None:
    """Encrypted environment variables for apps (dstack format)."""


@env.command("encrypt")
@connection_options
@click.option("--app-id", required=True, help="app id, 20 bytes hex")
@click.option("--kms", "kms_url", default=None, envvar="PYDSTACK_KMS",
              help="KMS base URL [default: the local `pydstack up`'s KMS]")  # fmt: skip
@click.option("--kms-root", default=None,
              help="pinned KMS root k256 key (hex) [default: the cluster's root]")  # fmt: skip
@click.option("--kms-cluster", default=None,
              help="the KMS cluster whose root must sign the env key [default: this data dir's "
                   "(DATA_DIR/kms/cluster.json), else main]")  # fmt: skip
@click.option("--kms-ca", type=click.Path(exists=True, dir_okay=False), default=None,
              help="KMS CA certificate (PEM) to check the server with [default: the "
                   "cluster's]")  # fmt: skip
@click.option("--kms-dev-pki", type=click.Path(file_okay=False), default=None,
              help="with no CA to pin: check the KMS's RA-TLS under this simulator PKI "
                   "(simulated TDX) [default: DATA_DIR/dev-pki when there is one]")  # fmt: skip
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="write raw bytes here (default: hex on stdout)")  # fmt: skip
@click.argument("env_file", type=click.Path(exists=True, dir_okay=False))
@click.pass_context
def encrypt(
    ctx: click.Context, app_id: str, kms_url: str | None, kms_root: str | None,
    kms_cluster: str | None, kms_ca: str | None, kms_dev_pki: str | None, output: str | None,
    env_file: str,
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
    roots: dict[str, bytes] = {}
    ca_pem = Path(kms_ca).read_text() if kms_ca else None
    if pinned is not None:
        roots[PINNED] = pinned
    else:
        trust = asyncio.run(cluster_trust(conn, kms_cluster, None))
        if trust.root is not None:
            roots[trust.cluster] = trust.root
            ca_pem = ca_pem or trust.ca_pem
        elif trust.reachable:
            others = asyncio.run(_clusters(conn))
            raise click.ClickException(
                f"the log holds no root of KMS cluster {trust.cluster} (clusters on it: "
                f"{', '.join(others) or 'none'}); pass --kms-cluster NAME or --kms-root HEX"
            )
    pki = None
    if ca_pem is None:
        pki, where = dev_pki_of(conn, kms_dev_pki)
        how = (f"under the dev PKI {where}: SIMULATED TDX, no real TEE" if pki is not None
               else "under Intel's root")  # fmt: skip
        click.echo(f"no KMS CA to pin: {url} must be an attested KMS (RA-TLS, kms:rpc), "
                   f"checked {how}", err=True)  # fmt: skip
    pub, meta_root = asyncio.run(fetch_env_pubkey(url, aid, ca_pem, dev_pki=pki))
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


async def _clusters(conn: Conn) -> list[str]:
    async with await connect(conn) as store:
        return await clusters_on_log(store)
