"""The KMS cluster a data dir belongs to, and that cluster's root: what an app's env key must
be signed by (`pydstack env encrypt`, `deploy --env-file`, the dashboard's deploy form).

Only the pinned cluster's root counts, never "any `KmsRootCreated` on the log": the log may
hold other clusters' roots, and an env key signed by one of them is sealed to a KMS that does
not serve this app. `pydstack up` records its KMS's cluster and root in
`DATA_DIR/kms/cluster.json` (public values) once its KMS serves; a data dir without one pins
cluster `main`, with the root the log holds for it.

    pin = read_pin(data_dir)                    # ClusterPin or None
    created = await cluster_root(store, "main")  # the admitted KmsRootCreated of dstack.kms.main
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from pydstack.adapters.nats import EventStore
from pydstack.adapters.secretfile import write_secret
from pydstack.core.events import KmsRootCreated, subject

DEFAULT_CLUSTER = "main"  # the cluster every `pydstack up` KMS serves
PIN_FILE = Path("kms") / "cluster.json"


class ClusterPin(msgspec.Struct, frozen=True):
    cluster: str
    k256_root: str  # hex of the root's compressed secp256k1 public key
    ca_cert_pem: str = ""  # the cluster's KMS CA (what TLS to any of its replicas chains to)


class PinError(ValueError):
    """The data dir's pin cannot be read; the message names the file."""


def read_pin(data_dir: Path) -> ClusterPin | None:
    path = data_dir / PIN_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PinError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return msgspec.json.decode(raw, type=ClusterPin)
    except msgspec.DecodeError as exc:
        raise PinError(f"{path}: {exc}; delete it, the next `pydstack up` writes it") from None


def write_pin(data_dir: Path, created: KmsRootCreated) -> ClusterPin:
    pin = ClusterPin(created.cluster, created.k256_public_key.hex(), created.ca_cert_pem)
    write_secret(data_dir / PIN_FILE, msgspec.json.format(msgspec.json.encode(pin)) + b"\n")
    return pin


async def cluster_root(store: EventStore, cluster: str) -> KmsRootCreated | None:
    """The cluster's root as the KMS itself folds it: the first `KmsRootCreated` on
    `dstack.kms.<cluster>` that the write policy admits."""
    from .service import _load_state

    return (await _load_state(store, subject("kms", cluster))).root
