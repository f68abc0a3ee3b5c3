"""The proxy's certificate provider over the folded log: swaps in new certificates, drops
removed domains, and keeps serving the last good one when a new key does not open."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pydstack.actors.gateway.cert_provider import LogCertProvider
from pydstack.adapters.acme import seal_secret
from pydstack.core.events import (
    AnyEvent,
    CertificateIssued,
    GatewayDomainAdded,
    GatewayDomainRemoved,
)
from pydstack.core.gateway.certs import CERT_KEY, CertState, CertStore, fold
from pydstack.core.gateway.sealing import ClusterKey, binding
from pydstack.core.projections import Applied

KEY = ClusterKey(bytes(range(32)))
DOMAIN = "apps.example.com"


def self_signed() -> tuple[str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), pem


def issued(event_id: str, sealed_to: ClusterKey = KEY) -> CertificateIssued:
    chain, key_pem = self_signed()
    sealed = seal_secret(sealed_to.public, key_pem, binding(CERT_KEY, "c", DOMAIN, event_id))
    return CertificateIssued(
        cluster="c", domain=DOMAIN, attempt="a", names=(DOMAIN,), cert_chain_pem=chain,
        not_before=0, not_after=1, sealed_key=sealed,
    )  # fmt: skip


class Log:
    def __init__(self) -> None:
        self.events: list[Applied] = []
        self.state = CertState(cluster="c")

    def add(self, event_id: str, event: AnyEvent) -> CertState:
        self.events.append(Applied(len(self.events) + 1, 0, event, event_id))
        self.state = fold(self.events, CertState(cluster="c"))
        return self.state


def test_new_certificates_are_swapped_in_and_removed_domains_dropped() -> None:
    log, provider = Log(), LogCertProvider(CertStore(KEY))
    log.add("e1", GatewayDomainAdded(cluster="c", domain=DOMAIN, acme_directory="https://ca/d"))
    assert provider.update(log.state) == [] and provider.server_context(DOMAIN, h2=False) is None
    log.add("e2", issued("e2"))
    assert provider.update(log.state) == [DOMAIN]
    assert provider.update(log.state) == []  # unchanged: nothing rebuilt
    first = provider.server_context(DOMAIN, h2=False)
    assert first is not None and provider.serving(DOMAIN) == "e2"
    log.add("e3", issued("e3"))
    assert provider.update(log.state) == [DOMAIN]
    assert provider.server_context("Apps.Example.com.", h2=False) is not first
    log.add("e4", GatewayDomainRemoved(cluster="c", domain=DOMAIN))
    assert provider.update(log.state) == [DOMAIN]
    assert provider.server_context(DOMAIN, h2=True) is None and provider.serving(DOMAIN) is None


def test_a_key_that_does_not_open_leaves_the_last_good_certificate_in_place() -> None:
    log, provider = Log(), LogCertProvider(CertStore(KEY))
    log.add("e1", GatewayDomainAdded(cluster="c", domain=DOMAIN, acme_directory="https://ca/d"))
    log.add("e2", issued("e2"))
    provider.update(log.state)
    good = provider.server_context(DOMAIN, h2=True)
    log.add("e3", issued("e3", sealed_to=ClusterKey(bytes(32))))  # another cluster's key
    assert provider.update(log.state) == []
    assert provider.server_context(DOMAIN, h2=True) is good and provider.serving(DOMAIN) == "e2"
