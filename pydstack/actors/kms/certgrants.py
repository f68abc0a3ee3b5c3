"""SignCert decisions, bounded per instance and usage: a few decisions (and their log
entries) per (app, instance, compose hash, usage) and window, each then re-used.

A CVM asks for certificates again and again (its gateway registration, every `GetTlsKey` of
its apps), and an app can ask in a loop. Deciding each one as a key request appends a
`KeyRequested` (its whole attestation, up to 256 KiB) and a decision: an instance could grow
the permanent log without bound. So a SignCert is decided as any key request (evidence
verified, `KeyRequested` with its ``usage``, the backend asked, `KeyIssued`/`KeyDenied`, on
the boot-time measurements as dstack decides SignCert: `at_boot`) only when no decision of
its key inside the window has the same BootInfo; that decision becomes a *grant*. Within a
grant's window (`ISSUED_TTL` for an issue, `DENIED_TTL` for a refusal, from the decision's
``verified_at``) every later SignCert of the key whose freshly verified evidence yields the
**same BootInfo** is answered under it and appends nothing: an issue signs the new
certificate (each request's evidence is still verified, so it binds its own key), a refusal
answers the same 403 with the decision's request id. Another BootInfo of that very instance
(a TCB status that changed with the collateral, another claimed image) gets its own
decision, at most `PER_WINDOW` per key in a window; beyond, 429 `rate_limited`, nothing
appended, until the oldest leaves its window. Concurrent requests for one key wait for the
one decision in flight. A re-used issue is checked again against what the KMS reads from the
log itself (the image, the log backend's composes: `KmsService.decide_csr`): once revoked,
it is dropped and the request decided anew (refused, and recorded).

Bound: per key and window at most `PER_WINDOW` `KeyRequested` + decision pairs per KMS
replica (replicas share grants through the log only when they load it, at their first
SignCert). The usage is one of four values (EKU flags), so one instance and compose hash add
at most 4 x 3 x 2 = 24 events per replica per hour however often it asks, 2 per usage for a
CVM whose measurements do not change. Grants survive a restart: they are read back from the
log at the first SignCert. At most `CAPACITY` keys are held (least recently used first out);
an evicted key costs one more decision, never a wrong answer. A new instance id needs a new
attested boot, so a flood of distinct instances is bounded by what attests, as for
`GetAppKey`.

    grants = CertGrants()
    grant = await grants.decide(key, boot, now, lambda: decide_on_the_log())
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence

import msgspec

from pydstack.adapters.tdx.attestation import AttestationDecodeError, decode_attestation
from pydstack.adapters.tdx.errors import TdxError
from pydstack.adapters.tdx.eventlog import EventLogError, RuntimeEvent
from pydstack.adapters.tdx.identity import decode_app_info, measurements_of
from pydstack.adapters.tdx.quote import parse_quote
from pydstack.core.events import BootInfo, KeyDenied, KeyIssued, KeyRequested

ISSUED_TTL = 3600  # seconds an issue is re-used for (dstack's gateway client renews hourly)
DENIED_TTL = 300  # seconds a refusal is re-used for (the app's owner may allow it meanwhile)
PER_WINDOW = 3  # decisions per key and window (a TCB status or image change of an instance)
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


class RateLimited(Exception):
    """Another decision for this key was made inside its window for other measurements."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


def at_boot(boot: BootInfo, quote: bytes, runtime_events: Sequence[RuntimeEvent]) -> BootInfo:
    """`boot` with dstack's boot-time measurements, what SignCert decides on (dstack
    ``decode_app_info(boottime_mr=true)``): RTMR3 replayed up to ``boot-mr-done`` and no key
    provider (dstack's boot-time BootInfo has an empty ``key_provider_info``), so the events an
    app emits after boot change neither decision nor grant."""
    boot = msgspec.structs.replace(boot, key_provider_info="")
    try:
        info = decode_app_info(
            measurements_of(parse_quote(quote).report), runtime_events, boottime_mr=True
        )
    except (EventLogError, TdxError, ValueError):
        return boot  # verified evidence decodes; keep what the verification built
    return msgspec.structs.replace(
        boot, mr_aggregated=info.mr_aggregated.hex(), mr_system=info.mr_system.hex()
    )


def boot_time_of(attestation: bytes, boot: BootInfo) -> BootInfo:
    """The auditor's `core.kms.audit.BootTime`: `at_boot` of a recorded attestation."""
    try:
        att = decode_attestation(attestation)
    except AttestationDecodeError:
        return boot  # the re-check reports the attestation itself
    return at_boot(boot, att.quote, att.runtime_events)


def usage_of(server_auth: bool, client_auth: bool) -> str:
    """The usage a SignCert decision is made for: the certificate's EKU flags."""
    names = [n for n, on in (("server", server_auth), ("client", client_auth)) if on]
    return "+".join(names) or "none"


def grant_key(boot: BootInfo, usage: str) -> GrantKey:
    return (boot.app_id, boot.instance_id, boot.compose_hash, usage)


def grants_on_log(events: Iterable[object]) -> dict[GrantKey, list[Grant]]:
    """The SignCert grants per key among the (admitted) events of a KMS subject, oldest
    first."""
    asked: dict[str, KeyRequested] = {}
    out: dict[GrantKey, list[Grant]] = {}
    for e in events:
        if isinstance(e, KeyRequested) and e.method == SIGN_CERT and e.usage:
            asked[e.request_id] = e
        elif isinstance(e, KeyIssued | KeyDenied) and e.request_id in asked:
            req = asked.pop(e.request_id)
            if e.boot_info is not None:
                grant = Grant(e.request_id, req.verified_at, e)
                out.setdefault(grant_key(e.boot_info, req.usage), []).append(grant)
    for grants in out.values():
        grants.sort(key=lambda g: g.decided_at)
    return out


class CertGrants:
    """The grants one KMS instance holds; `decide` is the only way to get one."""

    def __init__(
        self,
        *,
        issued_ttl: int = ISSUED_TTL,
        denied_ttl: int = DENIED_TTL,
        per_window: int = PER_WINDOW,
        capacity: int = CAPACITY,
    ) -> None:
        self.issued_ttl, self.denied_ttl = issued_ttl, denied_ttl
        self.per_window, self.capacity = per_window, capacity
        self._grants: OrderedDict[GrantKey, list[Grant]] = OrderedDict()
        self._deciding: dict[GrantKey, asyncio.Future[Grant]] = {}
        self.loaded = False

    def load(self, grants: dict[GrantKey, list[Grant]]) -> None:
        for key, found in grants.items():
            for grant in found:
                self._put(key, grant)
        self.loaded = True

    def _ttl(self, grant: Grant) -> int:
        return self.issued_ttl if isinstance(grant.outcome, KeyIssued) else self.denied_ttl

    def _put(self, key: GrantKey, grant: Grant) -> None:
        kept = [*self._grants.get(key, []), grant][-self.per_window :]
        self._grants[key] = kept
        self._grants.move_to_end(key)
        while len(self._grants) > self.capacity:
            self._grants.popitem(last=False)

    def drop(self, key: GrantKey, grant: Grant) -> None:
        """Forget `grant` (what it decided no longer holds: its image or compose was
        revoked since); the next request of its BootInfo gets a new decision."""
        kept = [g for g in self._grants.get(key, []) if g is not grant]
        if kept:
            self._grants[key] = kept
        else:
            self._grants.pop(key, None)

    def current(self, key: GrantKey, now: int) -> list[Grant]:
        """The key's decisions still inside their window, oldest first."""
        valid = [g for g in self._grants.get(key, []) if now < g.decided_at + self._ttl(g)]
        if valid:
            self._grants.move_to_end(key)
        return valid

    async def decide(
        self,
        key: GrantKey,
        boot: BootInfo | None,
        now: int,
        decision: Callable[[], Awaitable[Grant]],
    ) -> Grant:
        """The grant `boot` is answered under: a current one of the same BootInfo, else a new
        decision (one at a time per key), at most `per_window` of them in a window;
        `RateLimited` beyond."""
        while True:
            valid = self.current(key, now)
            same = [g for g in valid if g.boot == boot]
            if same:
                return same[-1]
            pending = self._deciding.get(key)
            if pending is None:
                break
            # then look again: it may be for another BootInfo, or have failed (decide anew)
            await asyncio.wait([pending])
        if len(valid) >= self.per_window:
            wait = max(1, min(g.decided_at + self._ttl(g) for g in valid) - now)
            raise RateLimited(
                f"this instance's SignCert for usage {key[3]!r} was already decided "
                f"{len(valid)} times in this window for other measurements (last: request "
                f"{valid[-1].request_id}); at most {self.per_window} decisions per instance, "
                f"compose hash and usage per window: retry in {wait} s",
                wait,
            )
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
