"""Wildcard certificates from a real ACME CA (pebble, DNS-01 through pebble-challtestsrv), kept
on a real NATS stream and served identically by every gateway node."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pydstack.actors.decode import decode_message
from pydstack.actors.gateway.certs import add_domain
from pydstack.adapters.nats import EventStore, NatsServer
from pydstack.core.events import (
    AcmeAccountCreated,
    AnyEvent,
    CertificateIssued,
    CertificateRenewalFailed,
    CertificateRenewalStarted,
)
from pydstack.core.gateway.certs import CERT_KEY, AddDomain, RenewalPolicy, domain_subject
from pydstack.core.gateway.sealing import ClusterKey, SealError, binding, open_sealed

from .conftest import CLUSTER, DUE, Nodes
from .pebble import Pebble, missing_binaries, running_pebble

DOMAIN = "apps.example.com"


async def events_on(store: EventStore, subject: str) -> list[AnyEvent]:
    recs, _ = await store.read_aggregate(subject)
    return [decode_message(r.subject, r.data)[1] for r in recs]


def count(events: list[AnyEvent], kind: type) -> int:
    return sum(isinstance(e, kind) for e in events)


async def add(
    store: EventStore,
    pebble: Pebble,
    domain: str = DOMAIN,
    *,
    contact: tuple[str, ...] = (),
    dns_provider: str = "",
) -> None:
    cmd = AddDomain(
        domain=domain, acme_directory=pebble.directory_url, contact=contact,
        dns_provider=dns_provider,
    )  # fmt: skip
    await add_domain(store, CLUSTER, cmd)


@contextlib.asynccontextmanager
async def tls_server(ctx: ssl.SSLContext) -> AsyncIterator[int]:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hello")
        await w.drain()
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def handshake(port: int, client: ssl.SSLContext, name: str) -> ssl.SSLObject:
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=name)
    assert await r.read() == b"hello"
    obj = w.get_extra_info("ssl_object")
    w.close()
    assert isinstance(obj, ssl.SSLObject)
    return obj


async def test_a_wildcard_certificate_chains_to_pebbles_root(nodes: Nodes) -> None:
    gw = await nodes.node("gw1", ClusterKey.derive(b"s" * 32, CLUSTER))
    await add(gw.view.store, nodes.pebble, contact=("mailto:ops@example.com",))
    assert await gw.reconcile_once() == [DOMAIN]

    d = gw.state.domains[DOMAIN]
    assert d.cert is not None and d.cert.names == (f"*.{DOMAIN}", DOMAIN)
    leaf = x509.load_pem_x509_certificate(d.cert.chain_pem.encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(d.cert.names)
    assert 3590 <= d.cert.not_after - d.cert.not_before <= 3600  # pebble's configured validity
    # the proxy's provider terminates TLS for any name under the base domain
    ctx = gw.provider.server_context(DOMAIN, h2=True)
    assert ctx is not None
    trusting_pebble = ssl.create_default_context(cadata=(await nodes.pebble.root_pem()).decode())
    trusting_pebble.set_alpn_protocols(["h2", "http/1.1"])
    async with tls_server(ctx) as port:
        for name in (f"0123abcd-8080.{DOMAIN}", f"app-443s.{DOMAIN}", DOMAIN):
            obj = await handshake(port, trusting_pebble, name)
            assert obj.selected_alpn_protocol() == "h2"
        with pytest.raises(ssl.SSLCertVerificationError):  # not a name it covers
            await handshake(port, trusting_pebble, "app.other.example.com")
        other_root = ssl.create_default_context(cafile=nodes.pebble.ca_bundle)
        with pytest.raises(ssl.SSLCertVerificationError):  # the chain is pebble's, nobody else's
            await handshake(port, other_root, DOMAIN)


async def test_every_node_serves_byte_identical_certificates_and_keys(
    nodes: Nodes, cluster_key: ClusterKey
) -> None:
    gw1 = await nodes.node("gw1", cluster_key)
    gw2 = await nodes.node("gw2", cluster_key)
    outsider = await nodes.node("gw-other-cluster-key", ClusterKey.derive(b"x" * 32, CLUSTER))
    await add(gw1.view.store, nodes.pebble)
    async with gw1.running(interval_s=0.2), gw2.running(interval_s=0.2):  # both loops race
        for _ in range(200):
            if gw1.provider.serving(DOMAIN) and gw2.provider.serving(DOMAIN):
                break
            await asyncio.sleep(0.05)
    one, two = gw1.certs.get(DOMAIN, gw1.state), gw2.certs.get(DOMAIN, gw2.state)
    assert one is not None and one == two
    assert gw2.provider.serving(DOMAIN) == gw1.provider.serving(DOMAIN)
    # the key is the certificate's own
    chain, key_pem = one
    leaf = x509.load_pem_x509_certificate(chain)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()  # type: ignore[union-attr]
    # exactly one order: the loser of the claim never ordered
    events = await events_on(gw1.view.store, domain_subject(CLUSTER, DOMAIN))
    assert count(events, CertificateRenewalStarted) == count(events, CertificateIssued) == 1
    # a node with another cluster key sees the certificate but cannot open its key
    await outsider.refresh()
    assert outsider.state.domains[DOMAIN].cert is not None
    with pytest.raises(SealError, match="sealed for cluster key"):
        outsider.certs.get(DOMAIN, outsider.state)
    assert outsider.provider.server_context(DOMAIN, h2=False) is None


async def test_renewal_waits_for_the_window_then_exactly_one_node_renews(
    nodes: Nodes, cluster_key: ClusterKey
) -> None:
    first = await nodes.node("gw0", cluster_key)
    await add(first.view.store, nodes.pebble)
    assert await first.reconcile_once() == [DOMAIN]
    before = first.state.domains[DOMAIN].cert
    assert before is not None
    assert await first.reconcile_once() == []  # fresh: outside the renewal window

    # three nodes whose window covers the whole lifetime all notice at once
    renewers = [await nodes.node(f"gw{i}", cluster_key, DUE) for i in (1, 2, 3)]
    results = await asyncio.gather(*(n.reconcile_once() for n in renewers))
    assert sorted(results) == [[], [], [DOMAIN]]

    events = await events_on(first.view.store, domain_subject(CLUSTER, DOMAIN))
    assert count(events, CertificateRenewalStarted) == 2
    assert count(events, CertificateIssued) == 2
    claims = [e for e in events if isinstance(e, CertificateRenewalStarted)]
    assert claims[1].reason == "expiring"
    winner = renewers[[bool(r) for r in results].index(True)]
    assert claims[1].node_id == winner.config.node_id
    # every node, the one that issued the old certificate too, now serves the new one
    for n in [first, *renewers]:
        await n.refresh()
        after = n.state.domains[DOMAIN].cert
        assert after is not None and after.event_id != before.event_id
        assert after.not_after >= before.not_after
        assert n.provider.serving(DOMAIN) == after.event_id
    assert len({n.certs.get(DOMAIN, n.state) for n in [first, *renewers]}) == 1


async def test_one_account_for_the_cluster_even_when_nodes_order_at_once(
    nodes: Nodes, cluster_key: ClusterKey
) -> None:
    a, b = await nodes.node("gwa", cluster_key), await nodes.node("gwb", cluster_key)
    await add(a.view.store, nodes.pebble, "one.example.com")
    await add(a.view.store, nodes.pebble, "two.example.com")
    for _ in range(10):  # both nodes may order (a domain each, or one both)
        await asyncio.gather(a.reconcile_once(), b.reconcile_once())
        await a.refresh()
        if all(d.cert for d in a.state.domains.values()):
            break
    assert all(d.cert is not None for d in a.state.domains.values())
    accounts = []
    async for rec in a.view.store.read(subject="dstack.gateway.*"):
        _, event = decode_message(rec.subject, rec.data)
        if isinstance(event, AcmeAccountCreated):
            accounts.append(event)
    assert len(accounts) == 1 and accounts[0].account_uri.startswith("https://127.0.0.1")


async def test_a_failed_order_is_recorded_and_retried_after_a_backoff(
    nodes: Nodes, cluster_key: ClusterKey
) -> None:
    gw = await nodes.node("gw1", cluster_key)
    await add(gw.view.store, nodes.pebble, dns_provider="cloudflare")
    assert await gw.reconcile_once() == []
    events = await events_on(gw.view.store, domain_subject(CLUSTER, DOMAIN))
    failed = [e for e in events if isinstance(e, CertificateRenewalFailed)]
    assert len(failed) == 1 and "no DNS provider 'cloudflare'" in failed[0].error
    d = gw.state.domains[DOMAIN]
    assert (d.renewing, d.failures) == (False, 1)
    assert await gw.reconcile_once() == []  # backing off: no second claim yet
    events = await events_on(gw.view.store, domain_subject(CLUSTER, DOMAIN))
    assert count(events, CertificateRenewalStarted) == 1


async def test_no_private_key_is_on_the_stream_in_clear(
    nodes: Nodes, cluster_key: ClusterKey
) -> None:
    gw = await nodes.node("gw1", cluster_key)
    await add(gw.view.store, nodes.pebble)
    assert await gw.reconcile_once() == [DOMAIN]
    renewer = await nodes.node("gw2", cluster_key, DUE)
    assert await renewer.reconcile_once() == [DOMAIN]  # a second certificate key

    keys = [gw.certs.account_key(gw.state, nodes.pebble.directory_url)]
    seen = await events_on(gw.view.store, domain_subject(CLUSTER, DOMAIN))
    assert count(seen, CertificateIssued) == 2
    await gw.refresh()
    pair = gw.certs.get(DOMAIN, gw.state)
    assert pair is not None
    keys.append(pair[1])
    keys.append(first_key := await _first_cert_key(gw.view.store, cluster_key))
    assert first_key != pair[1]
    needles: list[bytes] = [b"PRIVATE KEY"]
    for pem in keys:
        assert pem is not None
        key = serialization.load_pem_private_key(pem, password=None)
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        scalar = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
        needles += [pem, pem.split(b"\n")[1], der, scalar]
    n = 0
    async for rec in gw.view.store.read():
        n += 1
        for needle in needles:
            assert needle not in rec.data, f"private key material in message {rec.seq}"
    assert n >= 6  # domain added, account, two claims, two certificates


async def _first_cert_key(store: EventStore, key: ClusterKey) -> bytes:
    """The first certificate's key, opened the way a node opens it (bound to its event id)."""
    recs, _ = await store.read_aggregate(domain_subject(CLUSTER, DOMAIN))
    for rec in recs:
        env, event = decode_message(rec.subject, rec.data)
        if isinstance(event, CertificateIssued):
            return open_sealed(key, event.sealed_key, binding(CERT_KEY, CLUSTER, DOMAIN, env.id))
    raise AssertionError("no certificate on the log")


async def test_the_loop_renews_a_short_lived_certificate_before_it_expires(
    nats_server: NatsServer, cluster_key: ClusterKey, tmp_path: Path
) -> None:
    if missing_binaries():
        pytest.skip("pebble not installed")
    policy = RenewalPolicy(renew_before_s=4, claim_timeout_s=60)
    async with (
        running_pebble(tmp_path / "short", validity_s=7) as short,
        contextlib.AsyncExitStack() as stack,
    ):
        fleet = Nodes(nats_server, short, stack)
        gw1 = await fleet.node("gw1", cluster_key, policy, order_timeout_s=30)
        gw2 = await fleet.node("gw2", cluster_key, policy, order_timeout_s=30)
        await add(gw1.view.store, short)
        subj = domain_subject(CLUSTER, DOMAIN)
        async with gw1.running(), gw2.running():  # no interval: they sleep until something is due
            for _ in range(300):
                events = await events_on(gw1.view.store, subj)
                if count(events, CertificateIssued) >= 2:
                    break
                await asyncio.sleep(0.05)
        issued = [e for e in events if isinstance(e, CertificateIssued)]
        claims = [e for e in events if isinstance(e, CertificateRenewalStarted)]
        assert len(issued) >= 2
        assert [c.reason for c in claims[:2]] == ["missing", "expiring"]
        # the renewal landed (stream time) before the first certificate expired
        recs, _ = await gw1.view.store.read_aggregate(subj)
        landed = [
            r.time_ns / 1e9
            for r in recs
            if isinstance(decode_message(r.subject, r.data)[1], CertificateIssued)
        ]
        assert landed[1] < issued[0].not_after
        assert issued[1].not_after > issued[0].not_after
        # claims and outcomes alternate: never two orders at once
        kinds = [
            type(e) for e in events if isinstance(e, CertificateRenewalStarted | CertificateIssued)
        ]
        assert all(a is not b for a, b in itertools.pairwise(kinds))
