"""What the QEMU backend needs before any QEMU starts: its own user and the firewall for it.

Under QEMU user networking a guest reaches the host's services from the QEMU process, so QEMU
runs as an unprivileged user (``adapters.qemu.user``) and the ``pydstack_guest_egress`` table
(``adapters.firewall``) lets that user open only ``HostServices`` on this host's addresses.
The table is replaced when the VMM starts and removed when it ends, unless a QEMU still runs:
CVMs outlive the VMM under the supervisor, and the rules must outlive it with them (the next
VMM replaces them). Usage::

    async with guarded_guests(HostServices(kms=(9100,))) as who:  # RunAs of QEMU's user
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from pydstack.adapters.firewall import (
    TABLE,
    FirewallError,
    GuestEgress,
    HostServices,
    RulesError,
    allowed,
    processes_of,
    unavailable_reason,
)
from pydstack.adapters.nats import StoreError
from pydstack.adapters.qemu.user import QEMU_USER, AccessError, ensure_user
from pydstack.adapters.supervisor import RunAs

_log = structlog.get_logger("pydstack.vmm")


@contextlib.asynccontextmanager
async def guarded_guests(
    services: HostServices, user: str = QEMU_USER, *, netns: Path | None = None
) -> AsyncIterator[RunAs]:
    """QEMU's user, created when missing, behind the guest egress rules while in the block;
    refuses (``StoreError``, one line) where that cannot be: not root, no ``nft``."""
    if (reason := unavailable_reason()) is not None:
        raise StoreError(f"qemu backend: {reason}")
    try:
        who = await asyncio.to_thread(ensure_user, user)
        fw = GuestEgress(who.uid, netns=netns)
        await fw.apply(services)
    except (AccessError, FirewallError, RulesError) as exc:
        raise StoreError(f"qemu backend: {exc}") from None
    ports = {f"{proto}_ports": list(open_) for proto, open_ in allowed(services).items()}
    _log.info("guest egress rules applied", table=TABLE, user=user, uid=who.uid, **ports)
    try:
        yield who
    finally:
        if left := await asyncio.to_thread(processes_of, who.uid):
            _log.info("guest egress rules kept: QEMU keeps running", table=TABLE, pids=left)
        else:
            try:
                await fw.remove()
                _log.info("guest egress rules removed", table=TABLE)
            except FirewallError as exc:
                _log.warning("guest egress rules not removed", table=TABLE, error=str(exc))
