"""The KMS instance's private root material at rest: one file, mode 0600, sealed.

The file holds `MAGIC || nonce(12) || AES-256-GCM(seal_key, root keys)` with the cluster name
as associated data. The seal key comes from the instance's own key provider, so only the same
(attested) KMS image on the same key provider can open it:

- `GuestAgentSealKey(socket)`: dstack's way inside a CVM: the guest agent's `GetKey` at a
  fixed path (derived from the app key the KMS's own key provider released);
- `KeyProviderSealKey(provider)`: any `pydstack_guest` `KeyProvider` (e.g. `LocalKeyProvider`
  on `appkeys.json`): HKDF of its app k256 key.

    store = RootKeyFile(path, cluster, GuestAgentSealKey("/var/run/dstack.sock"))
    await store.save(root); root = await store.load()
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Protocol

import aiohttp
import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pydstack.adapters.secretfile import write_secret
from pydstack.core.kms import RootKeys, hkdf
from pydstack_guest.provider import KeyProvider

MAGIC = b"PYDSKMS1"
SEAL_PATH = "pydstack/kms/root-seal"


class KeystoreError(Exception):
    """Root keys cannot be stored or opened; the message names the file and the cause."""


class SealKeySource(Protocol):
    async def seal_key(self) -> bytes: ...


class GuestAgentSealKey:
    """Seal key from a dstack guest agent (`POST /GetKey` on its unix socket)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    async def seal_key(self) -> bytes:
        conn = aiohttp.UnixConnector(path=self.socket_path)
        try:
            async with aiohttp.ClientSession(connector=conn) as s:
                body = {"path": SEAL_PATH, "purpose": "kms-root-seal", "algorithm": "secp256k1"}
                async with s.post("http://localhost/GetKey", json=body) as resp:
                    out = json.loads(await resp.text())
                    if resp.status != 200:
                        raise KeystoreError(f"guest agent GetKey answered {resp.status}: {out}")
        except (aiohttp.ClientError, OSError, ValueError) as e:
            raise KeystoreError(f"guest agent at {self.socket_path}: {e}") from None
        return bytes.fromhex(str(out["key"]))


class KeyProviderSealKey:
    def __init__(self, provider: KeyProvider) -> None:
        self.provider = provider

    async def seal_key(self) -> bytes:
        keys = await self.provider.app_keys()
        return hkdf(keys.k256_key, [SEAL_PATH.encode()])


class _Sealed(msgspec.Struct):
    ca_scalar: bytes
    k256: bytes


class RootKeyFile:
    def __init__(self, path: str | os.PathLike[str], cluster: str, source: SealKeySource) -> None:
        self.path = Path(path)
        self.cluster = cluster
        self.source = source

    def exists(self) -> bool:
        return self.path.exists()

    async def save(self, root: RootKeys) -> None:
        key = await self.source.seal_key()
        nonce = secrets.token_bytes(12)
        plain = msgspec.msgpack.encode(_Sealed(root.ca_scalar.to_bytes(32, "big"), root.k256))
        blob = MAGIC + nonce + AESGCM(key).encrypt(nonce, plain, self.cluster.encode())
        write_secret(self.path, blob)

    async def load(self) -> RootKeys:
        try:
            blob = self.path.read_bytes()
        except OSError as e:
            raise KeystoreError(f"cannot read root keys {self.path}: {e.strerror}") from None
        if self.path.stat().st_mode & 0o077:
            raise KeystoreError(f"{self.path} is readable by others; chmod 600 it")
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 12 + 16:
            raise KeystoreError(f"{self.path} is not a sealed pydstack KMS root key file")
        nonce, sealed = blob[len(MAGIC) : len(MAGIC) + 12], blob[len(MAGIC) + 12 :]
        key = await self.source.seal_key()
        try:
            plain = AESGCM(key).decrypt(nonce, sealed, self.cluster.encode())
        except InvalidTag:
            raise KeystoreError(
                f"{self.path} does not open with this instance's seal key (other key provider, "
                "image or cluster)"
            ) from None
        s = msgspec.msgpack.decode(plain, type=_Sealed)
        return RootKeys(ca_scalar=int.from_bytes(s.ca_scalar, "big"), k256=s.k256)
