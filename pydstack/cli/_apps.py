"""What ``deploy``, ``app`` and ``audit --app`` share: reading the log once, the gateway
clusters on it, and sealing an env file to an app's verified KMS key."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pydstack.adapters.nats import EventStore, Recorded
from pydstack.core.events import ALL_SUBJECTS, CodecError
from pydstack.core.gateway.cluster import ClusterState, on_its_subject
from pydstack.core.gateway.cluster import fold as fold_cluster
from pydstack.core.kms.envcrypt import EnvFileError, encrypt_env, parse_env_file
from pydstack.core.policy import Allowed, Gate
from pydstack.core.projections import Applied, applied

from ._common import Conn

if TYPE_CHECKING:
    from .env import ClusterTrust


def decoded(rec: Recorded) -> Applied | None:
    """The event for the folds, or None (unknown type, or bytes `pydstack audit` reports)."""
    try:
        return applied(rec.seq, rec.data, rec.time_ns)
    except (CodecError, ValueError):
        return None


async def read_log(store: EventStore, subject: str = ALL_SUBJECTS) -> list[Recorded]:
    """Every stored message on `subject`, in stream order, up to now."""
    if await store.last_seq() == 0:
        return []
    return [rec async for rec in store.read(subject=subject)]


async def read_events(store: EventStore, subject: str = ALL_SUBJECTS) -> list[tuple[str, Applied]]:
    """The events of `subject` the folds take; on the whole log, only what the write policy
    allows (what every actor folds: a refused AppUpgraded is not the app's compose here
    either; `pydstack audit` names the refusals)."""
    records = await read_log(store, subject)
    if subject == ALL_SUBJECTS:
        gate = Gate.pinned(store.anchor)
        records = [r for r in records if isinstance(gate.judge(r.seq, r.subject, r.data), Allowed)]
    return [(r.subject, a) for r in records if (a := decoded(r))]


@dataclass
class LogContext:
    """Gateway clusters as folded from the log (KMS roots: `env.cluster_trust`, by cluster)."""

    clusters: dict[str, ClusterState] = field(default_factory=dict)

    def base_domains(self) -> dict[str, str]:
        """cluster -> base domain of its up nodes (the first one's, they share it)."""
        out = {}
        for name, c in self.clusters.items():
            up = [n for n in c.nodes.values() if n.up]
            if up:
                out[name] = up[0].base_domain
        return out


async def log_context(store: EventStore) -> LogContext:
    ctx = LogContext()
    gateway = await read_events(store, "dstack.gateway.*")
    cvms = await read_events(store, "dstack.cvm.*")
    names = {s.split(".", 2)[2] for s, _ in gateway if ":" not in s}
    merged = sorted(gateway + cvms, key=lambda x: x[1].seq)
    for name in sorted(names):
        ours = (a for s, a in merged if on_its_subject(name, s, a.event))
        ctx.clusters[name] = fold_cluster(ours, ClusterState(cluster=name))
    return ctx


def kms_url_of(conn: Conn, given: str | None) -> str | None:
    return given or conn.data.state().get("kms_url") or None


def read_env_file(path: str) -> list[tuple[str, str]]:
    try:
        return parse_env_file(Path(path).read_text())
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror}"
        raise click.BadParameter(msg, param_hint="--env-file") from None
    except EnvFileError as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--env-file") from None


async def seal_env(
    kms_url: str, app_id: str, envs: list[tuple[str, str]], trust: ClusterTrust
) -> tuple[bytes, str]:
    """Encrypt `envs` to the app's env key from the KMS (GetAppEnvEncryptPubKey), accepted only
    when its signature recovers the root of the pinned KMS cluster (`env.cluster_trust`), over
    TLS to that cluster's KMS CA. Returns (blob, the cluster)."""
    from .env import fetch_env_pubkey, trusted_root

    if trust.root is None:
        raise click.ClickException(
            f"no root of KMS cluster {trust.cluster} on the log (KmsRootCreated) to check the "
            "env key against; start a KMS (pydstack up) before deploying with --env-file"
        )
    aid = bytes.fromhex(app_id)
    pub, _ = await fetch_env_pubkey(kms_url, aid, trust.ca_pem)
    cluster = trusted_root(pub, aid, {trust.cluster: trust.root}, kms_url)
    blob = encrypt_env(envs, pub.public_key, ephemeral=os.urandom(32), iv=os.urandom(12))
    return blob, cluster
