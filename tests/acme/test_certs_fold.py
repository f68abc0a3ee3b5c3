"""The pure certificate fold and decisions: given events and a time, the renewals out."""

from __future__ import annotations

import pytest

from pydstack.core.events import (
    AcmeAccountCreated,
    AnyEvent,
    CertificateIssued,
    CertificateRenewalFailed,
    CertificateRenewalStarted,
    CvmRecycled,
    GatewayDomainAdded,
    GatewayDomainRemoved,
)
from pydstack.core.gateway.certs import (
    AddDomain,
    CertState,
    CertStore,
    Renewal,
    RenewalPolicy,
    account_subject,
    decide_add_domain,
    decide_renewal,
    domain_subject,
    fold,
    next_check_s,
    on_its_subject,
)
from pydstack.core.gateway.sealing import ClusterKey, binding, seal
from pydstack.core.projections import Applied

T0 = 1_700_000_000
DAY = 86_400
DIR = "https://ca.example/dir"
POLICY = RenewalPolicy(renew_before_s=30 * DAY, claim_timeout_s=600, retry_base_s=60)
ADDED = GatewayDomainAdded(cluster="c", domain="apps.example.com", acme_directory=DIR)


def log(*timed: tuple[int, AnyEvent]) -> CertState:
    applied = [Applied(i + 1, t * 1_000_000_000, e, f"id{i + 1}") for i, (t, e) in enumerate(timed)]
    return fold(applied, CertState(cluster="c"))


def claim(attempt: str = "a1", node: str = "gw1") -> CertificateRenewalStarted:
    return CertificateRenewalStarted(
        cluster="c", domain="apps.example.com", node_id=node, attempt=attempt
    )


def issued(not_after: int, attempt: str = "a1", sealed_key: bytes = b"k") -> CertificateIssued:
    return CertificateIssued(
        cluster="c", domain="apps.example.com", attempt=attempt,
        names=("*.apps.example.com", "apps.example.com"), cert_chain_pem="PEM",
        not_before=not_after - 90 * DAY, not_after=not_after, sealed_key=sealed_key,
    )  # fmt: skip


def test_a_new_domain_needs_its_first_certificate() -> None:
    state = log((T0, ADDED))
    assert decide_renewal(state, T0, POLICY) == (
        Renewal(domain="apps.example.com", reason="missing", expected_seq=1),
    )
    assert state.domains["apps.example.com"].names == ("*.apps.example.com", "apps.example.com")


def test_a_fresh_certificate_needs_nothing_until_the_window_opens() -> None:
    state = log((T0, ADDED), (T0, claim()), (T0, issued(T0 + 90 * DAY)))
    d = state.domains["apps.example.com"]
    assert d.cert is not None and not d.renewing
    assert decide_renewal(state, T0 + 60 * DAY - 1, POLICY) == ()
    due = decide_renewal(state, T0 + 60 * DAY, POLICY)
    assert [(r.reason, r.expected_seq) for r in due] == [("expiring", 3)]
    assert next_check_s(state, T0 + 60 * DAY - 100, POLICY) == T0 + 60 * DAY
    assert next_check_s(state, T0, POLICY) == T0 + DAY  # look again at least daily


def test_a_live_claim_holds_off_other_nodes_until_it_expires() -> None:
    state = log((T0, ADDED), (T0 + 10, claim()))
    assert state.domains["apps.example.com"].renewing
    assert decide_renewal(state, T0 + 10 + 599, POLICY) == ()
    assert [r.reason for r in decide_renewal(state, T0 + 10 + 600, POLICY)] == ["retry"]


def test_a_failure_releases_the_claim_and_backs_off_exponentially() -> None:
    fail = CertificateRenewalFailed(
        cluster="c", domain="apps.example.com", attempt="a1", node_id="gw1", error="boom"
    )
    once = log((T0, ADDED), (T0, claim()), (T0, fail))
    d = once.domains["apps.example.com"]
    assert (d.renewing, d.failures, d.last_error) == (False, 1, "boom")
    assert decide_renewal(once, T0 + 59, POLICY) == ()
    assert [r.reason for r in decide_renewal(once, T0 + 60, POLICY)] == ["retry"]
    fail2 = CertificateRenewalFailed(
        cluster="c", domain="apps.example.com", attempt="a2", node_id="gw1", error="boom"
    )
    twice = log((T0, ADDED), (T0, claim()), (T0, fail), (T0 + 60, claim("a2")), (T0 + 60, fail2))
    assert decide_renewal(twice, T0 + 60 + 119, POLICY) == ()
    assert decide_renewal(twice, T0 + 60 + 120, POLICY) != ()
    # a success resets the count
    ok = log(
        (T0, ADDED),
        (T0, claim()),
        (T0, fail),
        (T0 + 60, claim("a2")),
        (T0 + 70, issued(T0 + 90 * DAY, "a2")),
    )
    assert ok.domains["apps.example.com"].failures == 0


def test_a_removed_domain_is_neither_renewed_nor_served() -> None:
    removed = GatewayDomainRemoved(cluster="c", domain="apps.example.com")
    state = log((T0, ADDED), (T0, claim()), (T0, issued(T0 + DAY)), (T0, removed))
    assert decide_renewal(state, T0 + DAY, POLICY) == ()
    assert CertStore(ClusterKey(bytes(32))).get("apps.example.com", state) is None


def test_turning_wildcard_off_orders_a_certificate_for_the_new_names() -> None:
    narrow = GatewayDomainAdded(
        cluster="c", domain="apps.example.com", acme_directory=DIR, wildcard=False
    )
    state = log((T0, ADDED), (T0, claim()), (T0, issued(T0 + 90 * DAY)), (T0, narrow))
    assert [r.reason for r in decide_renewal(state, T0, POLICY)] == ["missing"]


def test_other_clusters_and_other_events_change_nothing() -> None:
    other = GatewayDomainAdded(cluster="d", domain="apps.example.com", acme_directory=DIR)
    state = log((T0, other), (T0, CvmRecycled(instance_id="i")))
    assert state.domains == {} and state.seq == 2


def test_the_first_account_per_directory_wins() -> None:
    a = AcmeAccountCreated(cluster="c", acme_directory=DIR, account_uri="u1", sealed_key=b"1")
    b = AcmeAccountCreated(cluster="c", acme_directory=DIR, account_uri="u2", sealed_key=b"2")
    state = log((T0, a), (T0, b))
    assert state.accounts[DIR].account_uri == "u1" and state.accounts[DIR].event_id == "id1"


def test_events_count_only_on_their_own_subject() -> None:
    subj = domain_subject("c", "Apps.Example.com.")
    assert subj == "dstack.gateway.c:domain:apps_example_com"
    assert on_its_subject("c", subj, ADDED)
    assert not on_its_subject("c", domain_subject("c", "other.example.com"), ADDED)
    assert not on_its_subject("c", "dstack.gateway.c", ADDED)
    acct = AcmeAccountCreated(cluster="c", acme_directory=DIR, account_uri="u", sealed_key=b"")
    assert on_its_subject("c", account_subject("c", DIR), acct)
    assert not on_its_subject("c", subj, acct)
    long = ".".join(["a" * 60] * 4)
    assert len(domain_subject("c", long)) <= len("dstack.gateway.") + 128


def test_the_store_serves_the_unsealed_key_bound_to_its_event() -> None:
    key = ClusterKey(bytes(range(1, 33)))
    ad = binding("certificate-key", "c", "apps.example.com", "id3")
    sealed = seal(key.public, b"KEY PEM", ad, ephemeral=b"\x05" * 32, nonce=b"\x06" * 12)
    state = log((T0, ADDED), (T0, claim()), (T0, issued(T0 + DAY, sealed_key=sealed)))
    assert CertStore(key).get("APPS.example.com.", state) == (b"PEM", b"KEY PEM")
    moved = log(
        (T0, ADDED), (T0, claim()), (T0, claim("a2")), (T0, issued(T0 + DAY, sealed_key=sealed))
    )
    from pydstack.core.gateway.sealing import SealError

    with pytest.raises(SealError):  # same blob in another event (id4): refused
        CertStore(key).get("apps.example.com", moved)


@pytest.mark.parametrize(
    ("cmd", "refusal"),
    [
        (AddDomain(domain="localhost", acme_directory=DIR), "not a domain name"),
        (AddDomain(domain="a_b.example.com", acme_directory=DIR), "not a domain name"),
        (AddDomain(domain="x.example.com", acme_directory="ftp://x"), "not an http"),
        (AddDomain(domain="x.example.com", acme_directory=DIR, contact=("ops@x",)), "mailto"),
        (AddDomain(domain="apps.example.com", acme_directory=DIR), "already served"),
    ],
)
def test_add_domain_refuses_bad_input(cmd: AddDomain, refusal: str) -> None:
    out = decide_add_domain(log((T0, ADDED)), cmd)
    assert isinstance(out, str) and refusal in out


def test_add_domain_normalizes_and_may_change_settings() -> None:
    cmd = AddDomain(domain="Apps.Example.COM.", acme_directory=DIR, contact=("mailto:o@x",))
    out = decide_add_domain(log((T0, ADDED)), cmd)
    assert isinstance(out, GatewayDomainAdded)
    assert (out.domain, out.contact, out.cluster) == ("apps.example.com", ("mailto:o@x",), "c")
