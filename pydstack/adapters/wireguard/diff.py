"""Desired peers vs current peers -> the smallest set of peer operations (pure).

Unchanged peers produce no operation at all, so their sessions, handshakes and counters
are never touched. A changed peer gets ``update_only`` with just the fields that differ.
Output order is deterministic (removals, then changes and adds, each by public key).

Usage::

    ops = diff_peers(desired, [p.config for p in status.peers])
    if ops:
        await device.apply(ops)
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import KeyFormatError
from .model import DeviceConfig, DeviceStatus, PeerConfig, PeerOp


def diff_peers(desired: Iterable[PeerConfig], current: Iterable[PeerConfig]) -> tuple[PeerOp, ...]:
    """Operations that turn ``current`` into ``desired``; empty when they already match."""
    want: dict[str, PeerConfig] = {}
    for peer in desired:
        if peer.public_key in want and want[peer.public_key] != peer:
            raise KeyFormatError(f"peer {peer.public_key} is desired twice with different configs")
        want[peer.public_key] = peer
    have = {p.public_key: p for p in current}
    removals = [PeerOp(public_key=k, remove=True) for k in sorted(have.keys() - want.keys())]
    upserts: list[PeerOp] = []
    for key in sorted(want):
        target = want[key]
        existing = have.get(key)
        if existing is None:
            upserts.append(
                PeerOp(
                    public_key=key,
                    endpoint=target.endpoint,
                    persistent_keepalive=target.persistent_keepalive,
                    replace_allowed_ips=True,
                    allowed_ips=target.allowed_ips,
                )
            )
            continue
        change = _change(existing, target)
        if change is not None:
            upserts.append(change)
    return (*removals, *upserts)


def _change(existing: PeerConfig, target: PeerConfig) -> PeerOp | None:
    # A desired endpoint of None means "whatever the peer roams to": never a change.
    endpoint = target.endpoint if target.endpoint not in (None, existing.endpoint) else None
    keepalive = (
        target.persistent_keepalive
        if target.persistent_keepalive != existing.persistent_keepalive
        else None
    )
    ips_changed = target.allowed_ips != existing.allowed_ips
    if endpoint is None and keepalive is None and not ips_changed:
        return None
    return PeerOp(
        public_key=target.public_key,
        update_only=True,
        endpoint=endpoint,
        persistent_keepalive=keepalive,
        replace_allowed_ips=ips_changed,
        allowed_ips=target.allowed_ips if ips_changed else (),
    )


def diff_device(desired: DeviceConfig, current: DeviceStatus) -> DeviceConfig | None:
    """Interface fields that differ (others None), or None when the interface matches."""
    key = desired.private_key
    key_differs = current.public_key != key.public_key().b64
    port = desired.listen_port
    port_differs = port is not None and port != current.listen_port
    mark = desired.fwmark
    mark_differs = mark is not None and mark != current.fwmark
    if not (key_differs or port_differs or mark_differs):
        return None
    return DeviceConfig(
        private_key=key,
        listen_port=port if port_differs else None,
        fwmark=mark if mark_differs else None,
    )


def apply_ops(current: Iterable[PeerConfig], ops: Iterable[PeerOp]) -> tuple[PeerConfig, ...]:
    """What a device holds after ``ops`` (the reference semantics backends must match)."""
    peers = {p.public_key: p for p in current}
    for op in ops:
        old = peers.get(op.public_key)
        if op.remove:
            peers.pop(op.public_key, None)
            continue
        if op.update_only and old is None:
            continue
        base = old or PeerConfig(public_key=op.public_key)
        ips = set(() if op.replace_allowed_ips else base.allowed_ips) | set(op.allowed_ips)
        peers[op.public_key] = PeerConfig(
            public_key=op.public_key,
            allowed_ips=tuple(ips),
            endpoint=op.endpoint if op.endpoint is not None else base.endpoint,
            persistent_keepalive=(
                op.persistent_keepalive
                if op.persistent_keepalive is not None
                else base.persistent_keepalive
            ),
        )
    return tuple(sorted(peers.values(), key=lambda p: p.public_key))
