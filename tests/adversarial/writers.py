"""Writers for the attacks on the write policy: a stream whose keyring binds the given signers,
and a raw client that publishes what it likes (no API, no policy check)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from pydstack.actors.trust import ensure_keyring
from pydstack.adapters.nats import EventStore, StreamSettings, new_event_id
from pydstack.core.events import Event, Signer, message_hash, seal
from pydstack.core.policy import HOST_BOUND
from tests.policy.given import ADMIN, HOSTS_OF, ROLE_OF

Wanted = list[tuple[bytes, str, str, tuple[str, ...]]]


def wanted(*signers: Signer) -> Wanted:
    """The keyring entries binding each of ``signers`` to its role (hosts for host-bound ones),
    as ``ensure_keyring`` takes them."""
    return [
        (s.public_key, s.actor, ROLE_OF[s], HOSTS_OF.get(s, ()) if ROLE_OF[s] in HOST_BOUND else ())
        for s in signers
    ]


@contextlib.asynccontextmanager
async def keyed_store(url: str, signer: Signer, entries: Wanted) -> AsyncIterator[EventStore]:
    """A store writing as ``signer`` on a fresh stream (deletes allowed) whose keyring, rooted
    in the admin key, holds ``entries`` (appended by the admin)."""
    settings = StreamSettings(deny_delete=False)
    async with await EventStore.connect(
        url, signer, settings=settings, anchor=ADMIN.public_key
    ) as s:
        await s.ensure_stream()
        async with await EventStore.connect(url, ADMIN, anchor=ADMIN.public_key) as admin:
            assert len(await ensure_keyring(admin, entries)) == len(entries)
        yield s


async def forge(
    url: str, by: Signer, subject: str, event: Event, *, zero_signature: bool = False
) -> int:
    """Publish ``event`` signed by ``by`` as a raw client would (no API, no policy check),
    linked to the subject's last message; returns its stream sequence."""
    async with await EventStore.connect(url, by) as s:
        last = await s.last_by_subject(subject)
        prev = message_hash(last.data) if last else b""
        data = seal(by, event, subject=subject, event_id=new_event_id(), time_ns=time.time_ns(),
                    correlation="attack", prev=prev)  # fmt: skip
        if zero_signature:
            data = data[:-64] + bytes(64)
        return int((await s.js.publish(subject, data)).seq)
