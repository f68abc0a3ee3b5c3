"""Sealing to the cluster key: only the cluster key opens, and only in the event it was sealed
for."""

from __future__ import annotations

import os

import pytest

from pydstack.adapters.acme import new_private_key_pem, seal_secret
from pydstack.adapters.acme.keys import create_cluster_secret, load_cluster_key
from pydstack.core.gateway.sealing import ClusterKey, SealError, binding, open_sealed, seal

SECRET = bytes(range(32))
KEY = ClusterKey.derive(SECRET, "default")
AD = binding("certificate-key", "default", "example.com", "event-1")


def test_sealed_key_opens_with_the_cluster_key() -> None:
    pem = new_private_key_pem()
    assert open_sealed(KEY, seal_secret(KEY.public, pem, AD), AD) == pem


def test_sealing_is_deterministic_given_its_randomness() -> None:
    # Pins the format: same inputs, same bytes; version 1, then the key id.
    a = seal(KEY.public, b"x", AD, ephemeral=b"\x01" * 32, nonce=b"\x02" * 12)
    assert a == seal(KEY.public, b"x", AD, ephemeral=b"\x01" * 32, nonce=b"\x02" * 12)
    assert a[0] == 1 and a[1:9].hex() == KEY.key_id
    assert len(a) == 1 + 8 + 32 + 12 + 1 + 16


def test_each_seal_is_fresh() -> None:
    assert seal_secret(KEY.public, b"x", AD) != seal_secret(KEY.public, b"x", AD)


def test_another_clusters_key_does_not_open_and_says_which_key() -> None:
    other = ClusterKey.derive(SECRET, "other")  # same secret, other cluster: another key
    blob = seal_secret(KEY.public, b"secret", AD)
    with pytest.raises(SealError, match=f"sealed for cluster key {KEY.key_id}"):
        open_sealed(other, blob, AD)


def test_a_blob_moved_to_another_event_or_domain_does_not_open() -> None:
    blob = seal_secret(KEY.public, b"secret", AD)
    for moved in (
        binding("certificate-key", "default", "example.com", "event-2"),
        binding("certificate-key", "default", "evil.com", "event-1"),
        binding("acme-account-key", "default", "example.com", "event-1"),
    ):
        with pytest.raises(SealError, match="moved to another event"):
            open_sealed(KEY, blob, moved)


def test_a_tampered_blob_does_not_open() -> None:
    blob = bytearray(seal_secret(KEY.public, b"secret", AD))
    blob[-1] ^= 1
    with pytest.raises(SealError):
        open_sealed(KEY, bytes(blob), AD)
    with pytest.raises(SealError, match="version 1"):
        open_sealed(KEY, b"\x02" + bytes(blob[1:]), AD)


def test_derivation_needs_enough_secret_and_hides_the_key() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        ClusterKey.derive(b"short", "default")
    assert ClusterKey.derive(SECRET, "default") == KEY
    assert KEY.private.hex() not in repr(KEY)


def test_cluster_secret_file_gives_the_same_key_on_every_node(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    path = create_cluster_secret(Path(tmp_path) / "cluster.secret")
    assert load_cluster_key(path, "c1") == load_cluster_key(path, "c1")
    assert load_cluster_key(path, "c1") != load_cluster_key(path, "c2")
    with pytest.raises(FileExistsError):
        create_cluster_secret(path)  # never overwritten: the log is sealed to it
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_cluster_key(path, "c1")
