"""Keep a gateway cluster's certificates current, and hand them to the proxy.

Every gateway node runs a ``CertKeeper``. Each pass it folds the cluster's domain and ACME
account aggregates (``CertView``), asks the pure ``decide_renewal`` which domains need an
order, and **claims** each with ``CertificateRenewalStarted`` appended at the domain version it
folded. When all nodes notice an expiring certificate at once, one claim lands and the others
conflict, fold again and see the domain claimed: exactly one node orders, and its
``CertificateIssued`` (appended at the claim's version) is what every node serves. Keys go on
the log only sealed to the cluster key (``core.gateway.sealing``). Usage::

    keeper = CertKeeper(store, cluster_key, CertKeeperConfig(cluster="default", node_id="gw1"),
                        providers={"": ChallTestSrvDns(url)})
    async with keeper.running():
        proxy = await ProxyServer.create(config, keeper.provider, table)

``add_domain`` is the core of ``pydstack gateway add-domain``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import structlog

from pydstack.adapters.acme import (
    AcmeClient,
    AcmeConfig,
    AcmeError,
    DnsProvider,
    new_private_key_pem,
    seal_secret,
    thumbprint,
)
from pydstack.adapters.nats import NEW, ConflictError, EventStore, Version, new_event_id
from pydstack.core.events import (
    AcmeAccountCreated,
    CertificateIssued,
    CertificateRenewalFailed,
    GatewayDomainAdded,
    message_hash,
)
from pydstack.core.gateway.certs import (
    ACCOUNT_KEY,
    CERT_KEY,
    AddDomain,
    CertState,
    CertStore,
    Domain,
    RenewalPolicy,
    account_subject,
    decide_add_domain,
    decide_renewal,
    domain_subject,
    fold,
    is_cert_subject,
    next_check_s,
    normalize_domain,
    start_renewal,
)
from pydstack.core.gateway.sealing import ClusterKey, binding
from pydstack.core.projections import Applied

from ..trust import Judge
from .cert_provider import LogCertProvider
from .view import to_applied

_log = structlog.get_logger("pydstack.gateway.certs")


class CertView:
    """The cluster's domain and account aggregates, folded; the version of each subject."""

    def __init__(self, store: EventStore, cluster: str, *, check_signatures: bool = True):
        self.store = store
        self.cluster = cluster
        self.check_signatures = check_signatures
        self.judge = Judge(f"gateway-{cluster}", store.anchor, verify=check_signatures)
        self.state = CertState(cluster=cluster)
        self.cursor = 0
        self.versions: dict[str, Version] = {}
        self._lock = asyncio.Lock()

    def version(self, subj: str) -> Version:
        return self.versions.get(subj, NEW)

    async def catch_up(self) -> int:
        """Fold everything stored since the cursor; returns how many messages were folded."""
        async with self._lock:
            last = await self.store.last_seq()
            if last <= self.cursor:
                return 0
            batch: list[Applied] = []
            seen = self.cursor
            await self.judge.load_keyring(self.store, last)
            recs = self.store.read(
                subject="dstack.gateway.*", from_seq=self.cursor + 1, until_seq=last
            )
            async for rec in recs:
                seen = rec.seq
                if is_cert_subject(self.cluster, rec.subject):
                    self.versions[rec.subject] = Version(rec.seq, message_hash(rec.data))
                    a = to_applied(self.cluster, rec, self.judge, certs=True)
                    if a is not None:
                        batch.append(a)
            self.state = fold(batch, self.state)
            # Only as far as what was read, not to `last`: a direct get served by a lagging
            # cluster replica may end the read short, and jumping there would skip those
            # events for good. The read is filtered, so `seen` also stays behind `last` when
            # other subjects were appended since; the next pass then reads that tail again
            # (one filtered get that finds nothing), the price of never skipping.
            self.cursor = max(self.cursor, seen)
            return len(batch)


@dataclass(frozen=True, slots=True)
class CertKeeperConfig:
    cluster: str
    node_id: str
    policy: RenewalPolicy = field(default_factory=RenewalPolicy)
    ca_bundle: str | None = None  # the ACME server's HTTPS CA (None: the system's roots)
    order_timeout_s: float = 120.0
    max_sleep_s: float = 300.0  # a pass at least this often, whatever next_check_s says
    poll_s: float = 1.0  # how often new events are folded (and due domains noticed)

    def __post_init__(self) -> None:
        # A claim must outlive the order it covers, or a second node could order meanwhile.
        if self.order_timeout_s >= self.policy.claim_timeout_s:
            raise ValueError("order_timeout_s must be shorter than the policy's claim_timeout_s")


class CertKeeper:
    """One node's certificate loop: claims, orders, appends outcomes, feeds the proxy."""

    def __init__(
        self,
        store: EventStore,
        key: ClusterKey,
        config: CertKeeperConfig,
        providers: Mapping[str, DnsProvider],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.view = CertView(store, config.cluster)
        self.key = key
        self.config = config
        self.providers = providers
        self.clock = clock
        self.certs = CertStore(key)
        self.provider = LogCertProvider(self.certs)
        self._clients: dict[str, tuple[str, AcmeClient]] = {}  # directory -> (event id, client)

    @property
    def state(self) -> CertState:
        return self.view.state

    async def refresh(self) -> None:
        """Fold new events and swap changed certificates into the proxy's provider."""
        await self.view.catch_up()
        self.provider.update(self.view.state)

    async def reconcile_once(self) -> list[str]:
        """One pass; returns the domains this node got a certificate for."""
        await self.refresh()
        now = int(self.clock())
        done = []
        due = decide_renewal(self.view.state, now, self.config.policy)
        for r in due:
            if await self._renew(r.domain, now):
                done.append(r.domain)
        if due:  # fold the outcomes (ours and the winners') before reporting
            await self.refresh()
        _log.info("certificates reconciled", node=self.config.node_id, issued=done,
                  domains=len(self.view.state.domains))  # fmt: skip
        return done

    async def _renew(self, domain: str, now: int) -> bool:
        # Decide again on a fresh fold and claim at the version of THAT fold (no await in
        # between): an earlier order in this pass may have taken long, and a claim must never
        # be appended at a version newer than the state it was decided on.
        await self.view.catch_up()
        cfg, state = self.config, self.view.state
        subj = domain_subject(cfg.cluster, domain)
        expected = self.view.version(subj)
        r = next((r for r in decide_renewal(state, now, cfg.policy) if r.domain == domain), None)
        if r is None:
            return False
        attempt = new_event_id()
        claim = start_renewal(state, r, node_id=cfg.node_id, attempt=attempt)
        try:
            claimed = await self.view.store.append(subj, [claim], expected)
        except ConflictError:
            _log.debug("another node claimed the order", domain=r.domain)
            return False
        _log.info("claimed certificate order", domain=r.domain, reason=r.reason, attempt=attempt)
        d = state.domains[r.domain]
        try:
            event, eid = await self._order(d, attempt)
        except Exception as exc:  # any failure of the order becomes an event, never silence
            _log.warning("certificate order failed", domain=r.domain, error=str(exc))
            failed = CertificateRenewalFailed(
                cluster=cfg.cluster, domain=r.domain, attempt=attempt, node_id=cfg.node_id,
                error=str(exc)[:500],
            )  # fmt: skip
            with contextlib.suppress(ConflictError):
                await self.view.store.append(subj, [failed], claimed)
            return False
        try:
            await self.view.store.append(subj, [event], claimed, event_ids=[eid])
        except ConflictError:  # our claim expired and another node took over: theirs counts
            _log.warning("certificate outcome superseded", domain=r.domain, attempt=attempt)
            return False
        _log.info("certificate issued", domain=r.domain, not_after=event.not_after)
        return True

    async def _order(self, d: Domain, attempt: str) -> tuple[CertificateIssued, str]:
        dns = self.providers.get(d.dns_provider)
        if dns is None:
            raise AcmeError(f"this node has no DNS provider {d.dns_provider!r} for {d.domain}")
        client = await self._client(d)
        key_pem = new_private_key_pem()
        issued = await client.issue(d.names, key_pem, dns)
        eid = new_event_id()
        sealed = seal_secret(
            self.key.public, key_pem, binding(CERT_KEY, self.config.cluster, d.domain, eid)
        )
        event = CertificateIssued(
            cluster=self.config.cluster, domain=d.domain, attempt=attempt, names=issued.names,
            cert_chain_pem=issued.chain_pem, not_before=issued.not_before,
            not_after=issued.not_after, sealed_key=sealed,
        )  # fmt: skip
        return event, eid

    def _acme_config(self, directory: str) -> AcmeConfig:
        cfg = self.config
        return AcmeConfig(directory, ca_bundle=cfg.ca_bundle, timeout_s=cfg.order_timeout_s)

    async def _client(self, d: Domain) -> AcmeClient:
        """The cluster's account at the domain's ACME directory; created (and put on the log,
        sealed) by the first node that needs it."""
        directory, cluster = d.acme_directory, self.config.cluster
        for _ in range(3):
            acct = self.view.state.accounts.get(directory)
            if acct is not None:
                cached = self._clients.get(directory)
                if cached is not None and cached[0] == acct.event_id:
                    return cached[1]
                key_pem = self.certs.account_key(self.view.state, directory)
                assert key_pem is not None
                client = await AcmeClient.open(
                    self._acme_config(directory), key_pem, contact=d.contact
                )
                self._clients[directory] = (acct.event_id, client)
                return client
            key_pem = new_private_key_pem()
            client = await AcmeClient.open(self._acme_config(directory), key_pem, contact=d.contact)
            eid = new_event_id()
            event = AcmeAccountCreated(
                cluster=cluster, acme_directory=directory, account_uri=client.account_uri,
                sealed_key=seal_secret(
                    self.key.public, key_pem, binding(ACCOUNT_KEY, cluster, directory, eid)
                ),
                thumbprint=thumbprint(key_pem),
            )  # fmt: skip
            subj = account_subject(cluster, directory)
            try:
                await self.view.store.append(subj, [event], NEW, event_ids=[eid])
            except ConflictError:  # another node created it first: use theirs
                await self.view.catch_up()
                continue
            _log.info("ACME account created", directory=directory, account=client.account_uri)
            self._clients[directory] = (eid, client)
            await self.view.catch_up()
            return client
        raise AcmeError(f"no ACME account for {directory} after 3 attempts")

    async def run(self, *, interval_s: float | None = None) -> None:
        """Reconcile forever: fold new events every ``poll_s`` (a domain just added, a
        certificate another node renewed), order when something is due, and pass at least
        every ``max_sleep_s`` (or ``interval_s`` if given). Errors are logged and retried;
        while the store is unreachable the provider keeps the certificates it has."""
        next_pass = 0.0
        failing = False
        while True:
            try:
                await self.refresh()
                now = self.clock()
                due = decide_renewal(self.view.state, int(now), self.config.policy)
                if due or now >= next_pass:
                    await self.reconcile_once()
                    now = self.clock()
                    wait = next_check_s(self.view.state, int(now), self.config.policy) - now
                    next_pass = now + min(max(wait, 1), interval_s or self.config.max_sleep_s)
                if failing:
                    _log.info("certificate keeper following the log again")
                failing = False
            except Exception as exc:  # a store outage must not end the node's loop
                if not failing:
                    _log.warning("certificate pass failed; retrying", error=str(exc))
                failing = True
            await asyncio.sleep(min(self.config.poll_s, interval_s or self.config.poll_s))

    @contextlib.asynccontextmanager
    async def running(self, *, interval_s: float | None = None) -> AsyncIterator[CertKeeper]:
        """Run :meth:`run` in the background while the block runs (cancelled at exit)."""
        await self.refresh()
        task = asyncio.create_task(self.run(interval_s=interval_s), name="cert-keeper")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _domain_state(store: EventStore, cluster: str, domain: str) -> tuple[CertState, Version]:
    try:
        subj = domain_subject(cluster, domain)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    recs, version = await store.read_aggregate(subj)
    judge = Judge(f"gateway-{cluster}", store.anchor)
    if recs:
        await judge.load_keyring(store, recs[-1].seq)
    applied = [a for r in recs if (a := to_applied(cluster, r, judge, certs=True)) is not None]
    return fold(applied, CertState(cluster=cluster)), version


async def add_domain(store: EventStore, cluster: str, cmd: AddDomain) -> GatewayDomainAdded:
    """Add a base domain to ``cluster`` (the core of ``pydstack gateway add-domain``).

    Reads the domain's aggregate, decides, appends at the version read; ValueError with the
    refusal when the command is not acceptable."""
    for _ in range(5):
        state, version = await _domain_state(store, cluster, cmd.domain)
        out = decide_add_domain(state, cmd)
        if isinstance(out, str):
            raise ValueError(out)
        try:
            await store.append(domain_subject(cluster, cmd.domain), [out], version)
        except ConflictError:
            continue
        return out
    raise ValueError(f"domain {cmd.domain}: too many concurrent changes, try again")


async def ensure_domain(store: EventStore, cluster: str, cmd: AddDomain) -> bool:
    """Add the domain unless it is already served from the same ACME directory (what a node
    started with ``--acme-directory`` does for its base domain; several nodes may race).
    True when this call added it."""
    try:
        await add_domain(store, cluster, cmd)
        return True
    except ValueError:
        state, _ = await _domain_state(store, cluster, cmd.domain)
        d = state.domains.get(normalize_domain(cmd.domain))
        if d is not None and d.active and d.acme_directory == cmd.acme_directory:
            return False
        raise
