"""Per-host identities: ``pydstack host add/remove`` and the NATS users that follow the keyring.

A further host gets keys of its own, bound on the log's keyring by the admin (the VMM key
bound to that host only), and a join bundle with only those seeds and the cluster's public
data (:mod:`pydstack.adapters.nats.bundle`). Removing it revokes its keys on the keyring:
every fold refuses its later events, its earlier ones stay valid. A server ``up`` runs
takes its users from the keyring (:func:`follow_nats_users`), so a bound key may log in and
a revoked one is logged out, on every node whose ``up`` follows the log. Usage::

    added = await add_host(admin_store, "h2", gateway=True)   # identities to put in a bundle
    await remove_host(admin_store, "h2")
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import structlog

from pydstack.adapters.nats import ConflictError, EventStore, StoreError
from pydstack.adapters.nats.identity import Identity
from pydstack.core.events import KeyRevoked
from pydstack.core.policy import (
    GATEWAY,
    KEYRING_FILTER,
    KEYRING_SUBJECT,
    KMS,
    NAME,
    VMM,
    Keyring,
)

from .trust import Judge, ensure_keyring

_log = structlog.get_logger("pydstack.hosts")


def host_identity_names(host: str) -> dict[str, str]:
    """Names of a host's own keys, by role: ``vmm-<host>`` (its VMM actor's durable consumer
    is also ``vmm-<host>``) and ``gateway-<host>``."""
    if not NAME.match(f"gateway-{host}"):
        raise StoreError(f"bad host name {host!r}: use 1-56 letters, digits, '_' or '-'")
    return {VMM: f"vmm-{host}", GATEWAY: f"gateway-{host}", KMS: f"kms-{host}"}


async def read_keyring(store: EventStore) -> tuple[Keyring, int]:
    """The log's keyring as of now (judged against the store's anchor) and its last seq."""
    records, version = await store.read_aggregate(KEYRING_SUBJECT)
    judge = Judge("keyring", store.anchor)
    judge.learn(records)
    return judge.gate.keyring, version.seq


async def add_host(
    admin: EventStore, host: str, *, gateway: bool = False, kms: bool = False
) -> list[Identity]:
    """Mint the host's keys and bind them on the keyring (signed by ``admin``): its VMM key
    with ``hosts=[host]``, and a gateway and a KMS key when asked for. A name already bound
    is refused (its seed was given out once; remove the host, add it under a new name)."""
    names = host_identity_names(host)
    ring, _ = await read_keyring(admin)
    taken = {b.name for b in ring.names().values()}
    wanted = [VMM, *([GATEWAY] if gateway else []), *([KMS] if kms else [])]
    for role in wanted:
        if names[role] in taken:
            raise StoreError(
                f"the keyring already holds {names[role]!r}: host {host!r} was added before; "
                "`pydstack host remove` it, then add it under another name"
            )
    if not ring.genesis:
        raise StoreError("the log has no keyring yet; start `pydstack up` once first")
    ids = [Identity.generate(names[role], role) for role in wanted]
    added = await ensure_keyring(
        admin, [(i.key, i.name, i.role, (host,) if i.role == VMM else ()) for i in ids]
    )
    if len(added) != len(ids):
        raise StoreError("the keyring refused the new keys: is this the cluster's admin key?")
    return ids


async def remove_host(admin: EventStore, host: str) -> list[KeyRevoked]:
    """Revoke every key bound to ``host`` only, and the host's own named keys: refused from
    their revocation on (NATS logs them out where ``up`` follows the keyring)."""
    names = set(host_identity_names(host).values())
    ring, _ = await read_keyring(admin)
    keys = [k for k, b in ring.names().items()
            if not b.revoked and (b.name in names or b.hosts == (host,))]  # fmt: skip
    if not keys:
        raise StoreError(f"no key of host {host!r} on the keyring (or already revoked)")
    return await revoke_keys(admin, keys)


async def revoke_keys(admin: EventStore, keys: Iterable[bytes]) -> list[KeyRevoked]:
    """Append ``KeyRevoked`` for each key the keyring holds and has not revoked yet."""
    keys = list(keys)
    for _ in range(10):
        ring, seq = await read_keyring(admin)
        new = [KeyRevoked(key=k) for k in keys
               if ring.bindings.get(k) and not ring.bindings[k][-1].revoked]  # fmt: skip
        if not new:
            return []
        if not ring.is_admin(admin.signer.public_key, seq + 1):
            raise StoreError("this key is not the keyring's admin: it cannot revoke keys")
        try:
            await admin.append(KEYRING_SUBJECT, new, seq)
        except ConflictError:
            continue  # another admin wrote meanwhile
        _log.info("keys revoked", keys=[k.hex()[:16] for k in keys])
        return new
    raise StoreError(f"{KEYRING_SUBJECT} kept changing; try again")


async def follow_nats_users(
    store: EventStore, on_change: Callable[[Keyring], None], *, from_seq: int = 1
) -> None:
    """Call ``on_change(keyring)`` now and after every keyring event from then on (until
    cancelled): how ``up`` keeps its server's users equal to the keyring."""
    judge = Judge("nats-users", store.anchor)
    records, version = await store.read_aggregate(KEYRING_FILTER)
    judge.learn(records)
    on_change(judge.gate.keyring)
    async for rec in store.read(subject=KEYRING_FILTER, from_seq=version.seq + 1, follow=True):
        judge.learn([rec])
        on_change(judge.gate.keyring)
        await asyncio.sleep(0)
