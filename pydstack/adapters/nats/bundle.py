"""Join bundles: what a further host needs to join a cluster, and nothing else.

``pydstack host add NAME`` (admin) writes one file, 0600: that host's own seeds (its VMM key,
and its gateway key when asked for) and the cluster's public data (NATS URLs, stream, the
admin anchor's public key and keyring.json entries, KMS URLs, the dev PKI's root certificate
when quotes are simulated). ``pydstack up --join BUNDLE`` installs it into the data dir. No
other identity's seed is ever in it: the joining host never holds the admin key. Usage::

    write_bundle(path, JoinBundle(host="h2", seeds={...}, nats_urls=(...), ...))
    bundle = read_bundle(path)
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydstack.adapters.secretfile import SecretFileError, read_secret, write_secret

from .errors import StoreError
from .identity import Identity, IdentityStore, load_anchor

__all__ = ["JoinBundle", "install_bundle", "is_bundle", "read_bundle", "write_bundle"]

_KIND = "pydstack-join-bundle"


@dataclass(frozen=True, slots=True)
class JoinBundle:
    host: str
    # identity name -> (role, nkey seed): only this host's own identities
    seeds: dict[str, tuple[str, str]]
    nats_urls: tuple[str, ...]
    stream: str
    anchor: bytes  # the admin public key every node pins
    keyring: list[dict[str, Any]]  # public keyring.json entries (no seeds)
    kms_urls: tuple[str, ...] = ()
    dev_pki_root: bytes = b""  # the simulator PKI's root certificate (DER), never its keys
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        doc = {
            "kind": _KIND, "version": 1, "host": self.host,
            "identities": [{"name": n, "role": r, "seed": s} for n, (r, s) in self.seeds.items()],
            "nats_urls": list(self.nats_urls), "stream": self.stream,
            "anchor": self.anchor.hex(), "keyring": self.keyring,
            "kms_urls": list(self.kms_urls),
            "dev_pki_root": base64.b64encode(self.dev_pki_root).decode() if self.dev_pki_root
            else None,
        }  # fmt: skip
        return json.dumps(doc, indent=2) + "\n"


def write_bundle(path: Path, bundle: JoinBundle) -> Path:
    """Write it 0600 (create-only: an existing bundle is never overwritten)."""
    try:
        return write_secret(path, bundle.to_json(), overwrite=False)
    except FileExistsError:
        raise StoreError(f"{path} exists; remove it or choose another --out") from None


def is_bundle(value: str) -> bool:
    """True when `--join VALUE` names a bundle file rather than NATS URLs."""
    return "://" not in value and Path(value).is_file()


def read_bundle(path: Path) -> JoinBundle:
    try:
        doc = json.loads(read_secret(path))
        if doc.get("kind") != _KIND:
            raise ValueError("not a join bundle")
        pki = doc.get("dev_pki_root")
        return JoinBundle(
            host=str(doc["host"]),
            seeds={str(i["name"]): (str(i["role"]), str(i["seed"])) for i in doc["identities"]},
            nats_urls=tuple(str(u) for u in doc["nats_urls"]),
            stream=str(doc["stream"]),
            anchor=bytes.fromhex(doc["anchor"]),
            keyring=list(doc["keyring"]),
            kms_urls=tuple(str(u) for u in doc.get("kms_urls", ())),
            dev_pki_root=base64.b64decode(pki) if pki else b"",
        )
    except (OSError, ValueError, KeyError, TypeError, SecretFileError) as exc:
        raise StoreError(f"bad join bundle {path}: {exc}") from None


def install_bundle(bundle: JoinBundle, ids: IdentityStore, data_dir: Path) -> dict[str, Identity]:
    """Put the bundle's keys (0600, create-only) and its public keyring.json into a data dir;
    the identities by role. A data dir pinned to another admin key is refused."""
    if ids.keyring_path.exists() and load_anchor(ids.keyring_path) not in (None, bundle.anchor):
        raise StoreError(f"{ids.keyring_path} pins another cluster's admin key; use a fresh "
                         "--data-dir for this bundle")  # fmt: skip
    ids.dir.mkdir(parents=True, exist_ok=True)
    ids.dir.chmod(0o700)
    out: dict[str, Identity] = {}
    for name, (role, seed) in bundle.seeds.items():
        ident = Identity(name, role, seed)
        path = ids.path(name)
        if path.exists():
            if read_secret(path).decode().strip() != seed:
                raise StoreError(f"{path} holds another key than the bundle's {name!r}")
        else:
            write_secret(path, seed + "\n", overwrite=False)
        out[role] = ident
    entries = [e for e in bundle.keyring if "seed" not in e]
    tmp = ids.keyring_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": 1, "identities": entries}, indent=2) + "\n")
    tmp.replace(ids.keyring_path)
    if load_anchor(ids.keyring_path) != bundle.anchor:
        raise StoreError("the bundle's keyring does not list its admin anchor")
    if bundle.dev_pki_root:  # what simulated quotes chain to (verifiers); never its keys
        (data_dir / "dev-pki-root.der").write_bytes(bundle.dev_pki_root)
    return out
