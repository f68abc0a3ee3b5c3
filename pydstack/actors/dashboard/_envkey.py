"""Where the deploy form gets the X25519 key it encrypts env vars to.

With a KMS configured, the key is the KMS's answer to ``GetAppEnvEncryptPubKey``, accepted
only when its timestamped signature recovers the KMS root k256 key: the root recorded on the
log (``KmsRootCreated``) when there is one, else the root GetMeta reports (then said so).
Without a KMS it is a development key kept in the data dir (``DevEnvKey``), and the form says
that too. Usage::

    source = DevEnvKey.load_or_create(data_dir / "dashboard" / "dev-env.key")
    key = await source.get(app_id)     # EnvKey(public_key="ab…", source="dev", detail="…")
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, Literal, Protocol

import aiohttp
import msgspec
from cryptography.hazmat.primitives.asymmetric import x25519

from pydstack.adapters.secretfile import write_secret

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
    """The app's env key from a KMS, checked against the KMS root (see the module doc)."""

    def __init__(
        self, url: str, *, ca_pem: str | None = None, root: Callable[[], bytes | None]
    ) -> None:
        self.url = url
        self.ca_pem = ca_pem
        self.root = root  # the root k256 key on the log, if any

    async def get(self, app_id: str) -> EnvKey:
        from pydstack.actors.kms.client import KmsCallError, KmsClient
        from pydstack.core.kms import DerivationError, EnvPubKey, env_pubkey_signer

        aid = bytes.fromhex(app_id)
        try:
            async with KmsClient(self.url, ca_pem=self.ca_pem, timeout=10.0) as kms:
                resp = await kms.call("GetAppEnvEncryptPubKey", {"app_id": app_id})
                pinned = self.root()
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
                f"KMS {self.url}: env key signed by {signer.hex()}, not the KMS root {root.hex()}"
            )
        how = "the KMS root on the log" if pinned else "the root GetMeta reports (not pinned)"
        return EnvKey(
            public_key=pub.public_key.hex(),
            source="kms",
            detail=f"KMS {self.url} GetAppEnvEncryptPubKey, signature checked against {how}",
        )
