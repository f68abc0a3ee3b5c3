"""SignCert decisions, bounded per instance and usage: a decision is made (and logged) once
per (app, instance, compose hash, usage) and window, then re-used.

A CVM asks for certificates again and again (its gateway registration, every `GetTlsKey` of
its apps), and an app can ask in a loop. Deciding each one as a key request appends a
`KeyRequested` (its whole attestation, up to 256 KiB) and a decision: an instance could grow
the permanent log without bound. So the first SignCert of an instance for a usage is decided
as any key request (evidence verified, `KeyRequested` with its ``usage``, the backend asked,
`KeyIssued`/`KeyDenied`, on the boot-time measurements as dstack decides SignCert: `at_boot`)
and becomes a *grant*; within the grant's window (`ISSUED_TTL` for an
issue, `DENIED_TTL` for a refusal, from the decision's ``verified_at``) every later SignCert of
that key whose freshly verified evidence yields the **same BootInfo** is answered under it and
appends nothing: an issue signs the new certificate (each certificate's evidence is still
verified, so it binds its own key), a refusal answers the same 403 with the decision's request
id. The same key with another BootInfo inside the window (another TCB status, image or
measurement of that very instance) is refused, 429 `rate_limited`, nothing appended; after
the window the next request is decided anew. Concurrent requests for one key wait for the one
decision in flight.

Bound: per key and window at most one `KeyRequested` + one decision per KMS replica (replicas
share grants through the log only when they load it, at their first SignCert). The usage is
one of four values (EKU flags), so one instance and compose hash add at most 8 events per
replica per hour, however often it asks. Grants survive a restart: they are read back from
the log at the first SignCert. At most `CAPACITY` keys are held (least recently used first
out); an evicted key costs one more decision, never a wrong answer. A new instance id needs
a new attested boot, so a flood of distinct instances is bounded by what attests, as for
`GetAppKey`.

    grants = CertGrants()
    grant = await grants.decide(key, boot, now, lambda: decide_on_the_log())
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence

import msgspec

from pydstack.adapters.tdx.errors import TdxError
from pydstack.adapters.tdx.eventlog import EventLogError, RuntimeEvent
from pydstack.adapters.tdx.identity import decode_app_info, measurements_of
from pydstack.adapters.tdx.quote import parse_quote
from pydstack.core.events import BootInfo, KeyDenied, KeyIssued, KeyRequested

ISSUED_TTL = 3600  # seconds an issue is re-used for (dstack's gateway client renews hourly)
DENIED_TTL = 300  # seconds a refusal is re-used for (the app's owner may allow it meanwhile)
CAPACITY = 65536
SIGN_CERT = "SignCert"

GrantKey = tuple[str, str, str, str]  # (app_id, instance_id, compose_hash, usage), hex


class Grant(msgspec.Struct, frozen=True):
    request_id: str
    decided_at: int
    outcome: KeyIssued | KeyDenied

    @property
    def boot(self) -> BootInfo | None:
        return self.outcome.boot_info

    def valid_at(self, now: int, issued_ttl: int, denied_ttl: int) -> bool:
        ttl = issued_ttl if isinstance(self.outcome, KeyIssued) else denied_ttl
        return now < self.decided_at + ttl


class RateLimited(Exception):
    """Another decision for this key was made inside its window for other measurements."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


def at_boot(boot: BootInfo, quote: bytes, runtime_events: Sequence[RuntimeEvent]) -> BootInfo:
    """`boot` with dstack's boot-time measurements, what SignCert decides on (dstack
    ``decode_app_info(boottime_mr=true)``): RTMR3 replayed up to ``boot-mr-done`` and no key
    provider, so the events an app emits after boot change neither decision nor grant."""
    try:
        info = decode_app_info(
            measurements_of(parse_quote(quote).report), runtime_events, boottime_mr=True
        )
    except (EventLogError, TdxError, ValueError):
        return boot  # verified evidence decodes; keep what the verification built
    return msgspec.structs.replace(
        boot, mr_aggregated=info.mr_aggregated.hex(), mr_system=info.mr_system.hex()
    )


def usage_of(server_auth: bool, client_auth: bool) -> str:
    """The usage a SignCert decision is made for: the certificate's EKU flags."""
    names = [n for n, on in (("server", server_auth), ("client", client_auth)) if on]
    return "+".join(names) or "none"


def grant_key(boot: BootInfo, usage: str) -> GrantKey:
    return (boot.app_id, boot.instance_id, boot.compose_hash, usage)


def grants_on_log(events: Iterable[object]) -> dict[GrantKey, Grant]:
    """The newest SignCert grant per key among the (admitted) events of a KMS subject."""
    asked: dict[str, KeyRequested] = {}
    out: dict[GrantKey, Grant] = {}
    for e in events:
        if isinstance(e, KeyRequested) and e.method == SIGN_CERT and e.usage:
            asked[e.request_id] = e
        elif isinstance(e, KeyIssued | KeyDenied) and e.request_id in asked:
            req = asked.pop(e.request_id)
            if e.boot_info is not None:
                key = grant_key(e.boot_info, req.usage)
                old = out.get(key)
                if old is None or old.decided_at <= req.verified_at:
                    out[key] = Grant(e.request_id, req.verified_at, e)
    return out


class CertGrants:
    """The grants one KMS instance holds; `decide` is the only way to get one."""

    def __init__(
        self,
        *,
        issued_ttl: int = ISSUED_TTL,
        denied_ttl: int = DENIED_TTL,
        capacity: int = CAPACITY,
    ) -> None:
        self.issued_ttl, self.denied_ttl, self.capacity = issued_ttl, denied_ttl, capacity
        self._grants: OrderedDict[GrantKey, Grant] = OrderedDict()
        self._deciding: dict[GrantKey, asyncio.Future[Grant]] = {}
        self.loaded = False

    def load(self, grants: dict[GrantKey, Grant]) -> None:
        for key, grant in grants.items():
            self._put(key, grant)
        self.loaded = True

    def _put(self, key: GrantKey, grant: Grant) -> None:
        self._grants[key] = grant
        self._grants.move_to_end(key)
        while len(self._grants) > self.capacity:
            self._grants.popitem(last=False)

    def current(self, key: GrantKey, now: int) -> Grant | None:
        grant = self._grants.get(key)
        if grant is None or not grant.valid_at(now, self.issued_ttl, self.denied_ttl):
            return None
        self._grants.move_to_end(key)
        return grant

    async def decide(
        self,
        key: GrantKey,
        boot: BootInfo | None,
        now: int,
        decision: Callable[[], Awaitable[Grant]],
    ) -> Grant:
        """The grant `boot` is answered under: a current one of the same BootInfo, else a new
        decision (one at a time per key); `RateLimited` when the current one is for another
        BootInfo."""
        while True:
            grant = self.current(key, now)
            if grant is not None:
                if grant.boot == boot:
                    return grant
                ttl = self.issued_ttl if isinstance(grant.outcome, KeyIssued) else self.denied_ttl
                wait = max(1, grant.decided_at + ttl - now)
                raise RateLimited(
                    f"this instance's SignCert for usage {key[3]!r} was decided at "
                    f"{grant.decided_at} (request {grant.request_id}) for other measurements; "
                    f"one decision per instance, compose hash and usage per window: retry in "
                    f"{wait} s",
                    wait,
                )
            pending = self._deciding.get(key)
            if pending is None:
                break
            # then look again: it may be for another BootInfo, or have failed (decide anew)
            await asyncio.wait([pending])
        fut: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        self._deciding[key] = fut
        try:
            grant = await decision()
        except BaseException:
            fut.cancel()  # waiters look again and decide themselves
            raise
        finally:
            del self._deciding[key]
        self._put(key, grant)
        fut.set_result(grant)
        return grant
