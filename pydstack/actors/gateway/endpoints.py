"""Where this node last reached each peer, kept across restarts (``state_dir/endpoints.json``).

A restarted node gets its key back (``wg.key``) and its peers back from the log, but not the
peers' endpoints or sessions: those lived in the old wireguard-go only. Until a CVM's own
wireguard-go sends a handshake initiation (after its 120 s rekey, a minute on average), the
node could not route to it. So the node saves the endpoints it sees, and after it re-applied
the peers from the log it gives each peer without an endpoint its saved one, with a
persistent keepalive: wireguard-go then initiates the handshake itself at once. The CVM needs
no change for this. Endpoints are this node's observation (another node may see another
address), so they stay in its state dir, not on the log::

    book = EndpointBook(state_dir / "endpoints.json")
    ops = restore_ops(book.load(), status.peers)    # after the first reconcile
    book.save(seen_endpoints(status.peers))         # every device read-back (writes on change)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import structlog

from pydstack.adapters.wireguard import KeyFormatError, PeerOp, PeerStatus
from pydstack.adapters.wireguard.model import normalize_endpoint

_log = structlog.get_logger("pydstack.gateway.endpoints")
RESTORE_KEEPALIVE_S = 25  # the CVM's own keepalive interval (gateway_client.bring_up_tunnel)


def seen_endpoints(peers: Iterable[PeerStatus]) -> dict[str, str]:
    """Public key -> endpoint of every peer the device knows an endpoint for."""
    return {p.public_key: p.endpoint for p in peers if p.endpoint}


def restore_ops(
    saved: Mapping[str, str], peers: Iterable[PeerStatus], *, keepalive: int = RESTORE_KEEPALIVE_S
) -> list[PeerOp]:
    """Peer updates that give each peer the device holds without an endpoint its saved one,
    with a persistent keepalive (so wireguard-go initiates a handshake right away). Peers
    with an endpoint already (they handshook meanwhile) are left alone."""
    return [
        PeerOp(
            public_key=p.public_key,
            update_only=True,
            endpoint=saved[p.public_key],
            persistent_keepalive=keepalive,
        )
        for p in sorted(peers, key=lambda p: p.public_key)
        if not p.endpoint and p.public_key in saved
    ]


class EndpointBook:
    """The saved endpoints: read once at start, rewritten (atomically) when they change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: dict[str, str] | None = None

    def load(self) -> dict[str, str]:
        """The saved endpoints; {} when there are none or the file is unreadable (a torn or
        edited file must not stop the node: the CVMs re-register by themselves)."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            _log.warning("saved peer endpoints unreadable; ignored", path=str(self.path),
                         error=str(e))  # fmt: skip
            return {}
        out: dict[str, str] = {}
        for key, endpoint in raw.items() if isinstance(raw, dict) else ():
            with contextlib.suppress(KeyFormatError, TypeError, AttributeError):
                out[str(key)] = normalize_endpoint(endpoint)
        self._last = dict(out)
        return out

    def save(self, endpoints: Mapping[str, str]) -> bool:
        """Write ``endpoints`` merged over what is saved (a peer that is away keeps its last
        endpoint until the log removes it: ``forget``); True when the file changed."""
        current = dict(self._last if self._last is not None else self.load())
        merged = {**current, **endpoints}
        if merged == current and self._last is not None:
            return False
        self._write(merged)
        return True

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the peers not in ``keep`` (removed from the table)."""
        current = self._last if self._last is not None else self.load()
        wanted = set(keep)
        kept = {k: v for k, v in current.items() if k in wanted}
        if kept != current:
            self._write(kept)

    def _write(self, endpoints: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(endpoints, sort_keys=True))
        os.replace(tmp, self.path)
        self._last = dict(endpoints)
