"""dstack's encrypted env vars: parse a .env file, encrypt to an app's X25519 key. Pure.

Format (dstack `docs/encrypted-env-spec.md`, dstack-sdk `encrypt_env_vars`): plaintext
`json.dumps({"env": [{"key": k, "value": v}, ...]})`; output `ephemeral_pub(32) || iv(12) ||
AES-256-GCM(shared, iv, plaintext)`, where `shared = X25519(ephemeral, app_pub)` is the AES key
as is (no KDF, no AAD). Randomness is passed in so the function stays pure and testable.

    blob = encrypt_env(parse_env_file(text), app_pub, ephemeral=os.urandom(32), iv=os.urandom(12))
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class EnvFileError(ValueError):
    """A .env line cannot be parsed; the message names the line."""


def parse_env_file(text: str) -> list[tuple[str, str]]:
    """KEY=VALUE lines; `#` comments, blank lines and `export ` prefixes are skipped/allowed;
    values in matching single or double quotes are unquoted."""
    out: list[tuple[str, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        s = s.removeprefix("export ").lstrip()
        key, sep, value = s.partition("=")
        key = key.strip()
        if not sep or not key or not (key.replace("_", "a").isalnum() and not key[0].isdigit()):
            raise EnvFileError(f"line {n}: expected KEY=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out.append((key, value))
    return out


def env_plaintext(envs: Sequence[tuple[str, str]]) -> bytes:
    return json.dumps({"env": [{"key": k, "value": v} for k, v in envs]}).encode()


def encrypt_env(
    envs: Sequence[tuple[str, str]], public_key: bytes, *, ephemeral: bytes, iv: bytes
) -> bytes:
    if len(public_key) != 32 or len(ephemeral) != 32 or len(iv) != 12:
        raise ValueError("need a 32-byte X25519 public key, 32-byte ephemeral secret, 12-byte iv")
    sk = x25519.X25519PrivateKey.from_private_bytes(ephemeral)
    shared = sk.exchange(x25519.X25519PublicKey.from_public_bytes(public_key))
    sealed = AESGCM(shared).encrypt(iv, env_plaintext(envs), None)
    return sk.public_key().public_bytes_raw() + iv + sealed
