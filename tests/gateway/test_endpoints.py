"""A gateway node's saved peer endpoints: what it re-applies after a restart (pure parts and
the file)."""

from __future__ import annotations

from pathlib import Path

from pydstack.actors.gateway.endpoints import EndpointBook, restore_ops, seen_endpoints
from pydstack.adapters.wireguard import PeerOp, PeerStatus, PrivateKey

A, B, C = (PrivateKey.generate().public_key().b64 for _ in range(3))


def test_restore_gives_saved_endpoints_with_a_keepalive_only_to_peers_without_one() -> None:
    """A peer that handshook meanwhile keeps its endpoint; one never seen gets nothing."""
    peers = [PeerStatus(public_key=A), PeerStatus(public_key=B, endpoint="127.0.0.1:7"),
             PeerStatus(public_key=C)]  # fmt: skip
    saved = {A: "127.0.0.1:5000", B: "127.0.0.1:6000"}
    assert restore_ops(saved, peers, keepalive=25) == [
        PeerOp(public_key=A, update_only=True, endpoint="127.0.0.1:5000", persistent_keepalive=25)
    ]
    assert seen_endpoints(peers) == {B: "127.0.0.1:7"}


def test_the_book_merges_saves_forgets_removed_peers_and_survives_a_torn_file(
    tmp_path: Path,
) -> None:
    """Saved endpoints come back in a new book (a restart); a torn file reads as none."""
    path = tmp_path / "endpoints.json"
    book = EndpointBook(path)
    assert book.load() == {}
    assert book.save({A: "127.0.0.1:5000"})
    assert not book.save({A: "127.0.0.1:5000"})  # unchanged: no write
    assert book.save({B: "[::1]:6000"})  # merged: A stays while it is away
    book.forget([B])
    assert EndpointBook(path).load() == {B: "[::1]:6000"}
    path.write_text('{"' + A)
    assert EndpointBook(path).load() == {}
