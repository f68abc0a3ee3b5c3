"""Where the deploy form gets the X25519 key it encrypts env vars to.

With a KMS configured, the key is the KMS's answer to ``GetAppEnvEncryptPubKey``, accepted
only when its timestamped signature recovers the root k256 key of the KMS cluster the dashboard
is pinned to by its id (``kms_cluster``): that cluster's root on the log (its
``KmsRootCreated``), never another cluster's, and then over TLS to that cluster's KMS CA. Only
when the log holds no root of that cluster is the root GetMeta reports taken (then said so),
from a server that must prove it is an attested KMS (RA-TLS, ``kms:rpc``; under the dev PKI
when simulated, also said so). Without a KMS it is a development key kept in the data dir
(``DevEnvKey``), and the form says that too. Usage::

    source = DevEnvKey.load_or_create(data_dir / "dashboard" / "dev-env.key")
    key = await source.get(app_id)     # EnvKey(public_key="ab…", source="dev", detail="…")
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Protocol

import aiohttp
import msgspec
from cryptography.hazmat.primitives.asymmetric import x25519

from pydstack.adapters.secretfile import write_secret

if TYPE_CHECKING:
    from pydstack.adapters.tdx.pki import DevPki
    from pydstack.core.events import KmsRootCreated

MAX_AGE_S: Final = 300


class EnvKeyError(Exception):
    """The key could not be fetched or was not trustworthy (one line, what to do)."""


class EnvKey(msgspec.Struct, frozen=True, kw_only=True):
    public_key: str  # hex, 32 bytes
    source: Literal["kms", "dev"]
    detail: str  # where it came from and what vouches for it, for the form to show


class EnvKeySource(Protocol):
    async def get(self, app_id: str) -> EnvKey: ...


class DevEnvKey:
    """A fixed X25519 key for development: every app's env is sealed to it."""

    def __init__(self, private_key: bytes, path: Path | None = None) -> None:
        self._key = x25519.X25519PrivateKey.from_private_bytes(private_key)
        self.path = path

    @classmethod
    def load_or_create(cls, path: Path) -> DevEnvKey:
        """The key in ``path`` (raw 32 bytes as hex), created with mode 0600 the first time."""
        if not path.exists():
            write_secret(path, os.urandom(32).hex() + "\n", overwrite=False)
        try:
            raw = bytes.fromhex(path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise EnvKeyError(
                f"bad dev env key {path}: {exc}; delete it to make a new one"
            ) from None
        if len(raw) != 32:
            raise EnvKeyError(f"dev env key {path} is not 32 bytes; delete it to make a new one")
        return cls(raw, path)

    @property
    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def private_bytes(self) -> bytes:
        return self._key.private_bytes_raw()

    async def get(self, app_id: str) -> EnvKey:
        where = f" ({self.path})" if self.path else ""
        return EnvKey(
            public_key=self.public_key.hex(),
            source="dev",
            detail=f"development key of this control plane{where}; no KMS is configured "
            "(pydstack up --dashboard-kms URL)",
        )


class KmsEnvKey:
    """The app's env key from a KMS, checked against the root of KMS cluster `cluster` (see
    the module doc)."""

    def __init__(
        self,
        url: str,
        *,
        cluster: str,
        root: Callable[[], KmsRootCreated | None],
        ca_pem: str | None = None,
        dev_pki: DevPki | None = None,
    ) -> None:
        self.url = url
        self.cluster = cluster
        self.root = root  # the cluster's root on the log, if any
        self.ca_pem = ca_pem  # a KMS CA to pin [default: the cluster's]
        self.dev_pki = dev_pki  # no CA to pin: the KMS's RA-TLS is checked under it (simulated)

    async def get(self, app_id: str) -> EnvKey:
        from pydstack.actors.kms.client import KmsCallError, KmsClient
        from pydstack.core.kms import DerivationError, EnvPubKey, env_pubkey_signer

        aid = bytes.fromhex(app_id)
        created = self.root()
        pinned = created.k256_public_key if created is not None else None
        ca_pem = self.ca_pem or (created.ca_cert_pem if created is not None else None) or None
        try:
            async with KmsClient(
                self.url, ca_pem=ca_pem, dev_pki=self.dev_pki, timeout=10.0
            ) as kms:
                resp = await kms.call("GetAppEnvEncryptPubKey", {"app_id": app_id})
                meta_root = None if pinned else str((await kms.call("GetMeta"))["k256_pubkey"])
        except (KmsCallError, aiohttp.ClientError, OSError, TimeoutError, KeyError) as exc:
            raise EnvKeyError(f"KMS {self.url}: {type(exc).__name__}: {exc}") from None
        try:
            pub = EnvPubKey(
                public_key=bytes.fromhex(resp["public_key"]),
                signature=bytes.fromhex(resp["signature"]),
                timestamp=int(resp["timestamp"]),
                signature_v1=bytes.fromhex(resp["signature_v1"]),
            )
            signer = env_pubkey_signer(pub, aid)
        except (KeyError, ValueError, DerivationError) as exc:
            raise EnvKeyError(f"KMS {self.url}: bad GetAppEnvEncryptPubKey answer: {exc}") from None
        if not -60 <= int(time.time()) - pub.timestamp <= MAX_AGE_S:
            raise EnvKeyError(f"KMS {self.url}: env key timestamp {pub.timestamp} is not fresh")
        root = pinned or bytes.fromhex((meta_root or "").removeprefix("0x"))
        if signer != root:
            raise EnvKeyError(
                f"KMS {self.url}: env key signed by {signer.hex()}, not KMS cluster "
                f"{self.cluster}'s root {root.hex()}"
            )
        if pinned:
            how = f"the KMS root on the log (cluster {self.cluster})"
        else:
            how = "the root GetMeta reports (not pinned; its RA-TLS checked" + (
                " under the dev PKI: SIMULATED TDX)" if self.dev_pki is not None else ")"
            )
        return EnvKey(
            public_key=pub.public_key.hex(),
            source="kms",
            detail=f"KMS {self.url} GetAppEnvEncryptPubKey, signature checked against {how}",
        )
