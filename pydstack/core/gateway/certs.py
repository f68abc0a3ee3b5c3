"""Certificates of a gateway cluster folded from the log, and when to renew them. Pure.

Each base domain is an aggregate of its own (:func:`domain_subject`); its history reads like::

    GatewayDomainAdded          the operator's ``pydstack gateway add-domain``
    CertificateRenewalStarted   node gw2 claims the order (OCC: one claim per domain version)
    CertificateIssued           gw2's outcome: chain + key sealed to the cluster key
    CertificateRenewalStarted   near expiry, whichever node wins the race claims again
    CertificateRenewalFailed    ... and the retry waits for a backoff

A claim is a lease: while it is younger than ``claim_timeout_s`` and has no outcome, other
nodes wait; a claim whose node died expires and may be taken again. Usage::

    state = fold(applied_events, CertState(cluster="default"))
    for r in decide_renewal(state, now_s, RenewalPolicy(renew_before_s=30 * 86400)):
        claim = start_renewal(r, node_id="gw1", attempt=new_id())  # append at r.expected_seq
    store = CertStore(cluster_key)
    store.get("example.com", state)  # (chain_pem, key_pem) or None, unsealed once per cert
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Final, Literal

import msgspec
from msgspec.structs import replace

from pydstack.core.events import (
    AcmeAccountCreated,
    CertificateIssued,
    CertificateRenewalFailed,
    CertificateRenewalStarted,
    GatewayDomainAdded,
    GatewayDomainRemoved,
    subject,
)
from pydstack.core.projections import Applied

from .sealing import ClusterKey, binding, open_sealed

CERT_KEY: Final = "certificate-key"  # sealing purposes (see sealing.binding)
ACCOUNT_KEY: Final = "acme-account-key"
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
Reason = Literal["missing", "expiring", "retry"]


def normalize_domain(text: str) -> str:
    """A base domain in canonical form (lower case, no trailing dot); ValueError if it is not
    a host name of at least two labels."""
    name = text.strip().lower().rstrip(".")
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(lb) for lb in labels):
        raise ValueError(f"{text!r} is not a domain name like 'apps.example.com'")
    return name


def domain_subject(cluster: str, domain: str) -> str:
    """``dstack.gateway.<cluster>:domain:<domain with '.' as '_'>`` (hashed when too long)."""
    slug = normalize_domain(domain).replace(".", "_")
    ident = f"{cluster}:domain:{slug}"
    if len(ident) > 128:
        ident = f"{cluster}:domain:h{hashlib.sha256(slug.encode()).hexdigest()[:40]}"
    return subject("gateway", ident)


def account_subject(cluster: str, acme_directory: str) -> str:
    """``dstack.gateway.<cluster>:acme:<sha256(directory URL)[:16]>``: one account per CA."""
    return subject(
        "gateway", f"{cluster}:acme:{hashlib.sha256(acme_directory.encode()).hexdigest()[:16]}"
    )


def is_cert_subject(cluster: str, subj: str) -> bool:
    """Whether ``subj`` holds this cluster's domain or ACME account events."""
    prefix = f"dstack.gateway.{cluster}:"
    return subj.startswith(prefix + "domain:") or subj.startswith(prefix + "acme:")


# -- state ------------------------------------------------------------------------------------


class IssuedCert(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str  # the CertificateIssued's envelope id: part of the key's sealing binding
    attempt: str
    names: tuple[str, ...]
    chain_pem: str
    not_before: int
    not_after: int
    sealed_key: bytes
    seq: int


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    attempt: str
    node_id: str
    since_s: int  # stream time of the claim
    reason: str = ""


class Domain(msgspec.Struct, frozen=True, kw_only=True):
    domain: str
    acme_directory: str
    contact: tuple[str, ...] = ()
    dns_provider: str = ""
    wildcard: bool = True
    active: bool = True
    cert: IssuedCert | None = None
    claim: Claim | None = None
    failures: int = 0  # consecutive failed attempts since the last issuance
    failed_s: int = 0  # stream time of the last failure
    last_error: str = ""
    seq: int = 0  # stream sequence of the last event on the domain's subject

    @property
    def names(self) -> tuple[str, ...]:
        return (f"*.{self.domain}", self.domain) if self.wildcard else (self.domain,)

    @property
    def renewing(self) -> bool:
        return self.claim is not None


class Account(msgspec.Struct, frozen=True, kw_only=True):
    acme_directory: str
    account_uri: str
    sealed_key: bytes
    event_id: str
    thumbprint: str = ""


class CertState(msgspec.Struct, frozen=True, kw_only=True):
    cluster: str
    domains: dict[str, Domain] = {}  # domain -> state; replaced, never mutated
    accounts: dict[str, Account] = {}  # ACME directory URL -> account
    seq: int = 0


def _with_domain(s: CertState, d: Domain) -> CertState:
    return replace(s, domains={**s.domains, d.domain: d})


def _added(old: Domain | None, e: GatewayDomainAdded, seq: int) -> Domain:
    d = Domain(
        domain=e.domain,
        acme_directory=e.acme_directory,
        contact=e.contact,
        dns_provider=e.dns_provider,
        wildcard=e.wildcard,
        seq=seq,
    )
    if old is not None and old.wildcard == e.wildcard:  # re-added: keep what it holds
        d = replace(d, cert=old.cert, claim=old.claim, failures=old.failures, failed_s=old.failed_s)
    return d


DomainEvent = (
    GatewayDomainRemoved | CertificateRenewalStarted | CertificateIssued | CertificateRenewalFailed
)


def _on_domain(d: Domain, e: DomainEvent, a: Applied) -> Domain:
    now_s = a.time_ns // 1_000_000_000
    d = replace(d, seq=a.seq)
    match e:
        case GatewayDomainRemoved():
            return replace(d, active=False, claim=None)
        case CertificateRenewalStarted():
            claim = Claim(attempt=e.attempt, node_id=e.node_id, since_s=now_s, reason=e.reason)
            return replace(d, claim=claim)
        case CertificateIssued():
            cert = IssuedCert(
                event_id=a.id,
                attempt=e.attempt,
                names=e.names,
                chain_pem=e.cert_chain_pem,
                not_before=e.not_before,
                not_after=e.not_after,
                sealed_key=e.sealed_key,
                seq=a.seq,
            )
            return replace(d, cert=cert, claim=None, failures=0, failed_s=0, last_error="")
        case CertificateRenewalFailed():
            still = None if d.claim is not None and d.claim.attempt == e.attempt else d.claim
            return replace(
                d, claim=still, failures=d.failures + 1, failed_s=now_s, last_error=e.error
            )


def apply(s: CertState, a: Applied) -> CertState:
    """One event onto the state (other clusters' and other kinds' events change nothing)."""
    e = a.event
    match e:
        case GatewayDomainAdded() if e.cluster == s.cluster:
            return _with_domain(s, _added(s.domains.get(e.domain), e, a.seq))
        case AcmeAccountCreated() if e.cluster == s.cluster:
            if e.acme_directory in s.accounts:
                return s  # the first one wins (appended with OCC: there is no second)
            acct = Account(
                acme_directory=e.acme_directory,
                account_uri=e.account_uri,
                sealed_key=e.sealed_key,
                event_id=a.id,
                thumbprint=e.thumbprint,
            )
            return replace(s, accounts={**s.accounts, e.acme_directory: acct})
        case (
            GatewayDomainRemoved()
            | CertificateRenewalStarted()
            | CertificateIssued()
            | CertificateRenewalFailed()
        ) if e.cluster == s.cluster and e.domain in s.domains:
            return _with_domain(s, _on_domain(s.domains[e.domain], e, a))
        case _:
            return s


def on_its_subject(cluster: str, subj: str, event: object) -> bool:
    """Whether the fold may take ``event`` stored on ``subj``: domain events only from their
    domain's subject, accounts only from their directory's (whose sequences guard them)."""
    match event:
        case AcmeAccountCreated():
            return subj == account_subject(cluster, event.acme_directory)
        case (
            GatewayDomainAdded()
            | GatewayDomainRemoved()
            | CertificateRenewalStarted()
            | CertificateIssued()
            | CertificateRenewalFailed()
        ):
            try:
                return subj == domain_subject(cluster, event.domain)
            except ValueError:
                return False
        case _:
            return False


def fold(events: Iterable[Applied], start: CertState) -> CertState:
    """Fold events in stream order; events at or below ``start.seq`` are skipped."""
    s = start
    for a in events:
        if a.seq <= s.seq:
            continue
        s = replace(apply(s, a), seq=a.seq)
    return s


# -- decisions ----------------------------------------------------------------------------------


class RenewalPolicy(msgspec.Struct, frozen=True, kw_only=True):
    renew_before_s: int = 30 * 86_400  # renew when the certificate expires within this
    claim_timeout_s: int = 600  # a claim without an outcome after this may be taken again
    retry_base_s: int = 60  # backoff after a failure: base * 2**(failures-1), capped
    retry_max_s: int = 6 * 3_600


class Renewal(msgspec.Struct, frozen=True, kw_only=True):
    """An order this node may claim: append the claim on the domain at ``expected_seq``."""

    domain: str
    reason: Reason
    expected_seq: int


def renewal_due(d: Domain, now_s: int, policy: RenewalPolicy) -> Reason | None:
    """Why ``d`` needs an order now, or None (fresh, claimed by a live node, backing off)."""
    if not d.active:
        return None
    if d.claim is not None and now_s < d.claim.since_s + policy.claim_timeout_s:
        return None
    if d.failures:
        backoff = min(policy.retry_max_s, policy.retry_base_s * 2 ** min(d.failures - 1, 20))
        if now_s < d.failed_s + backoff:
            return None
    if d.cert is None or d.cert.names != d.names:
        return "retry" if d.claim is not None or d.failures else "missing"
    if now_s >= d.cert.not_after - policy.renew_before_s:
        return "retry" if d.claim is not None or d.failures else "expiring"
    return None


def decide_renewal(
    state: CertState, now_s: int, policy: RenewalPolicy | None = None
) -> tuple[Renewal, ...]:
    """The domains whose certificate must be ordered now (sorted by domain)."""
    pol = policy or RenewalPolicy()
    out = []
    for name in sorted(state.domains):
        d = state.domains[name]
        reason = renewal_due(d, now_s, pol)
        if reason is not None:
            out.append(Renewal(domain=name, reason=reason, expected_seq=d.seq))
    return tuple(out)


def next_check_s(state: CertState, now_s: int, policy: RenewalPolicy | None = None) -> int:
    """The earliest time something may become due (now if something is due already)."""
    pol = policy or RenewalPolicy()
    times = [now_s + 86_400]
    for d in state.domains.values():
        if not d.active:
            continue
        if d.claim is not None:
            times.append(d.claim.since_s + pol.claim_timeout_s)
        if d.failures:
            times.append(
                d.failed_s + min(pol.retry_max_s, pol.retry_base_s * 2 ** min(d.failures - 1, 20))
            )
        if d.cert is not None:
            times.append(d.cert.not_after - pol.renew_before_s)
        else:
            times.append(now_s)
    return max(now_s, min(times))


def start_renewal(
    state: CertState, r: Renewal, *, node_id: str, attempt: str
) -> CertificateRenewalStarted:
    return CertificateRenewalStarted(
        cluster=state.cluster, domain=r.domain, node_id=node_id, attempt=attempt, reason=r.reason
    )


class AddDomain(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Operator input of ``pydstack gateway add-domain`` (unknown fields are refused)."""

    domain: str
    acme_directory: str
    contact: tuple[str, ...] = ()
    dns_provider: str = ""
    wildcard: bool = True


def decide_add_domain(state: CertState, cmd: AddDomain) -> GatewayDomainAdded | str:
    """The event that adds the domain, or why not (a one-line refusal)."""
    try:
        domain = normalize_domain(cmd.domain)
    except ValueError as exc:
        return str(exc)
    if not cmd.acme_directory.startswith(("https://", "http://")):
        return f"ACME directory {cmd.acme_directory!r} is not an http(s) URL"
    bad = [c for c in cmd.contact if not c.startswith("mailto:")]
    if bad:
        return f"contacts must be mailto: URIs, not {bad[0]!r}"
    old = state.domains.get(domain)
    if old is not None and old.active:
        same = (old.acme_directory, old.wildcard) == (cmd.acme_directory, cmd.wildcard)
        if same and (old.contact, old.dns_provider) == (cmd.contact, cmd.dns_provider):
            return f"domain {domain} is already served by cluster {state.cluster}"
    return GatewayDomainAdded(
        cluster=state.cluster,
        domain=domain,
        acme_directory=cmd.acme_directory,
        contact=cmd.contact,
        dns_provider=cmd.dns_provider,
        wildcard=cmd.wildcard,
    )


# -- the proxy's view ---------------------------------------------------------------------------


class CertStore:
    """Certificates ready to serve: chain and unsealed key per base domain.

    Opens each sealed key once (cached per domain until its certificate changes). Only active
    domains are served; an expired certificate still is (a stale one beats none, and its
    renewal is under way)::

        store = CertStore(cluster_key)
        pair = store.get("example.com", state)  # (chain_pem, key_pem) or None
    """

    def __init__(self, key: ClusterKey) -> None:
        self.key = key
        self._opened: dict[str, tuple[str, bytes, bytes]] = {}  # domain -> (event id, chain, key)

    def get(self, base_domain: str, state: CertState) -> tuple[bytes, bytes] | None:
        """(chain PEM, key PEM) for ``base_domain``; None if it has no certificate yet.
        Raises SealError when the key does not open (wrong cluster key, tampered log)."""
        d = state.domains.get(base_domain.lower().rstrip("."))
        if d is None or not d.active or d.cert is None:
            return None
        cert = d.cert
        got = self._opened.get(d.domain)
        if got is None or got[0] != cert.event_id:
            ad = binding(CERT_KEY, state.cluster, d.domain, cert.event_id)
            key_pem = open_sealed(self.key, cert.sealed_key, ad)
            got = (cert.event_id, cert.chain_pem.encode(), key_pem)
            self._opened[d.domain] = got
        return got[1], got[2]

    def account_key(self, state: CertState, acme_directory: str) -> bytes | None:
        """The ACME account's private key PEM for a directory, or None if none exists yet."""
        acct = state.accounts.get(acme_directory)
        if acct is None:
            return None
        ad = binding(ACCOUNT_KEY, state.cluster, acme_directory, acct.event_id)
        return open_sealed(self.key, acct.sealed_key, ad)
