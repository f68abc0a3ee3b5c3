"""Where the guest agent gets its app keys: a `KeyProvider` (local file now, KMS later).

The local provider reads dstack's `appkeys.json` (hex for bytes, `key_provider` as serde's
externally tagged enum) so a file from a dstack guest works unchanged:

    {"disk_crypt_key": "..", "env_crypt_key": "..", "k256_key": "..", "k256_signature": "..",
     "gateway_app_id": "", "ca_cert": "-----BEGIN CERTIFICATE-----..",
     "key_provider": {"Local": {"key": "-----BEGIN PRIVATE KEY-----..", "mr": ".."}}}

`create_dev_app_keys` writes such a file for development, with a throw-away "KMS root" whose
public key is stored as `kms_root_public` so signature chains can be checked end to end.

    keys = await LocalKeyProvider(path).app_keys()
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Protocol

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.adapters.tdx.ratls import build_ratls_cert

from . import rtmr3
from .keys import k256_public, kms_issue_app_key


class KeyProviderError(Exception):
    """App keys are unavailable or malformed; the message names the file and field."""


class AppKeys(msgspec.Struct, frozen=True):
    k256_key: bytes
    k256_signature: bytes
    ca_cert_pem: str
    ca_key_pem: str
    disk_crypt_key: bytes = b""
    env_crypt_key: bytes = b""
    gateway_app_id: str = ""
    provider_name: str = "local"
    provider_id: bytes = b""
    kms_root_public: bytes = b""
    # The KMS the keys came from (dstack's KeyProvider::Kms url): certificates (GetTlsKey,
    # the gateway's client certificate) come from its SignCert, under the app's CA and this
    # root CA, which the boot verified; empty for local keys, which sign with their own CA.
    kms_url: str = ""
    kms_ca_cert_pem: str = ""

    def ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.ca_cert_pem.encode())
        key = serialization.load_pem_private_key(self.ca_key_pem.encode(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyProviderError("app CA key is not an EC key")
        return cert, key

    def key_provider_info(self) -> bytes:
        """The `key-provider` runtime event payload dstack measures for these keys:
        `{"name":..,"id":..}`, a local provider's name being dstack's ``local-sgx``."""
        kind = self.provider_name if self.provider_name in rtmr3.KINDS else "local"
        return rtmr3.key_provider_info(kind, self.provider_id)


class KeyProvider(Protocol):
    async def app_keys(self) -> AppKeys: ...


def _hex(obj: dict[str, object], name: str, path: Path, default: bytes | None = None) -> bytes:
    value = obj.get(name)
    if value is None and default is not None:
        return default
    if not isinstance(value, str):
        raise KeyProviderError(f"{path}: field {name} must be a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise KeyProviderError(f"{path}: field {name} is not hex") from None


def parse_app_keys(text: str | bytes, path: Path = Path("appkeys.json")) -> AppKeys:
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise KeyProviderError(f"{path}: not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise KeyProviderError(f"{path}: want a JSON object")
    provider = obj.get("key_provider")
    if not isinstance(provider, dict) or len(provider) != 1:
        raise KeyProviderError(f"{path}: field key_provider must be {{kind: {{...}}}}")
    ((kind, body),) = provider.items()
    if kind == "Kms" or not isinstance(body, dict) or not isinstance(body.get("key"), str):
        raise KeyProviderError(f"{path}: key_provider {kind} has no local CA key (field key)")
    ca_cert = obj.get("ca_cert")
    if not isinstance(ca_cert, str):
        raise KeyProviderError(f"{path}: field ca_cert must be a PEM string")
    return AppKeys(
        k256_key=_hex(obj, "k256_key", path),
        k256_signature=_hex(obj, "k256_signature", path),
        ca_cert_pem=ca_cert,
        ca_key_pem=body["key"],
        disk_crypt_key=_hex(obj, "disk_crypt_key", path, b""),
        env_crypt_key=_hex(obj, "env_crypt_key", path, b""),
        gateway_app_id=str(obj.get("gateway_app_id", "")),
        provider_name=kind.lower(),
        provider_id=_hex(body, "mr", path, b""),
        kms_root_public=_hex(obj, "kms_root_public", path, b""),
    )


class LocalKeyProvider:
    """Reads app keys from a dstack `appkeys.json`; reads once, then serves from memory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._keys: AppKeys | None = None

    async def app_keys(self) -> AppKeys:
        if self._keys is None:
            try:
                text = self.path.read_bytes()
            except OSError as e:
                raise KeyProviderError(f"cannot read app keys {self.path}: {e.strerror}") from e
            self._keys = parse_app_keys(text, self.path)
        return self._keys


def create_dev_app_keys(
    app_id: bytes, *, now: int, root_secret: bytes | None = None
) -> tuple[AppKeys, str]:
    """Development app keys for `app_id` and their `appkeys.json` text."""
    root = root_secret or secrets.token_bytes(32)
    app_key, k256_sig = kms_issue_app_key(root, app_id)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build_ratls_cert(
        ca_key,
        None,
        subject="pydstack dev app CA",
        org_name="pydstack",
        ca_path_len=1,
        not_before=now - 3600,
        not_after=now + 10 * 365 * 86400,
    )
    ca_cert_pem = ca.public_bytes(serialization.Encoding.PEM).decode()
    ca_key_pem = ca_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    mr = secrets.token_bytes(32)
    doc = {
        "disk_crypt_key": secrets.token_bytes(32).hex(),
        "env_crypt_key": secrets.token_bytes(32).hex(),
        "k256_key": app_key.hex(),
        "k256_signature": k256_sig.hex(),
        "gateway_app_id": "",
        "ca_cert": ca_cert_pem,
        "key_provider": {"Local": {"key": ca_key_pem, "mr": mr.hex()}},
        "kms_root_public": k256_public(root).hex(),
    }
    text = json.dumps(doc, indent=2)
    return parse_app_keys(text), text
