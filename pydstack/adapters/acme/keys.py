"""Key material for certificates: fresh private keys, sealing with fresh randomness, and the
cluster secret file a gateway node is set up with (see ``core.gateway.sealing``).

    secret_path = create_cluster_secret(Path("/etc/pydstack/gateway-cluster.secret"))
    key = load_cluster_key(secret_path, cluster="default")  # the same on every node
    blob = seal_secret(key.public, pem, ad)
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.adapters.secretfile import write_secret
from pydstack.core.gateway.sealing import MIN_SECRET, ClusterKey, seal


def new_private_key_pem() -> bytes:
    """A fresh ECDSA P-256 private key, PKCS#8 PEM (account and certificate keys alike)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def seal_secret(recipient: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """``sealing.seal`` with a fresh ephemeral key and nonce from the OS."""
    return seal(recipient, plaintext, ad, ephemeral=os.urandom(32), nonce=os.urandom(12))


def create_cluster_secret(path: Path) -> Path:
    """Write a new cluster secret (64 hex digits, mode 0600); refuses to overwrite one, since
    every certificate on the log is sealed to the key it gives."""
    return write_secret(path, os.urandom(32).hex() + "\n", overwrite=False)


def load_cluster_key(path: Path, cluster: str) -> ClusterKey:
    """The cluster key from a secret file (hex); one line that says what is wrong otherwise."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read cluster secret {path}: {exc.strerror}") from None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"cluster secret {path} is not hex") from None
    if len(secret) < MIN_SECRET:
        raise ValueError(f"cluster secret {path} is shorter than {MIN_SECRET} bytes")
    if path.stat().st_mode & 0o077:
        raise ValueError(f"cluster secret {path} is readable by others: chmod 600 it")
    return ClusterKey.derive(secret, cluster)
