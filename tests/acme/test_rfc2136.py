"""DNS-01 through RFC 2136 dynamic updates with TSIG, against a real Knot DNS server that the
test starts on loopback; pebble validates its challenges by asking that server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509

from pydstack.actors.gateway.certs import CertKeeper, CertKeeperConfig
from pydstack.actors.gateway.dns_providers import TSIG_ALGORITHMS, dns_providers
from pydstack.adapters.acme import DnsError, Rfc2136Config, Rfc2136Dns
from pydstack.adapters.acme.rfc2136 import ALGORITHMS
from pydstack.adapters.nats import NatsServer
from pydstack.adapters.ports import free_port
from pydstack.adapters.secretfile import write_secret
from pydstack.core.events import CertificateIssued, CertificateRenewalFailed
from pydstack.core.gateway.certs import domain_subject
from pydstack.core.gateway.sealing import ClusterKey

from .conftest import CLUSTER, FRESH, Nodes
from .knot import Knot
from .pebble import Pebble
from .test_issue import add, count, events_on

DOMAIN = "apps.example.com"
CHALLENGE = f"_acme-challenge.{DOMAIN}."


@pytest.fixture
async def knot_nodes(nats_server: NatsServer, knot_pebble: Pebble) -> AsyncIterator[Nodes]:
    async with contextlib.AsyncExitStack() as stack:
        yield Nodes(nats_server, knot_pebble, stack)


async def keeper(nodes: Nodes, config: Rfc2136Config, name: str = "gw1") -> CertKeeper:
    """A gateway node's keeper with the providers its CLI options would give it."""
    cfg = CertKeeperConfig(
        cluster=CLUSTER, node_id=name, policy=FRESH, ca_bundle=nodes.pebble.ca_bundle,
        order_timeout_s=60,
    )  # fmt: skip
    key = ClusterKey.derive(b"k" * 32, CLUSTER)
    return CertKeeper(await nodes.store(name), key, cfg, dns_providers(rfc2136=config))


async def test_pebble_issues_a_wildcard_certificate_validated_against_the_real_server(
    knot_nodes: Nodes, knot: Knot
) -> None:
    gw = await keeper(knot_nodes, knot.config())
    await add(gw.view.store, knot_nodes.pebble)  # dns_provider "": RFC 2136 on this node
    assert await gw.reconcile_once() == [DOMAIN]

    d = gw.state.domains[DOMAIN]
    assert d.cert is not None and d.cert.names == (f"*.{DOMAIN}", DOMAIN)
    leaf = x509.load_pem_x509_certificate(d.cert.chain_pem.encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(d.cert.names)
    # no challtestsrv ran: pebble saw the two TXT values only through knotd's answers, which
    # took them as signed updates; both are gone again once the order is done
    assert knot_nodes.pebble.challtestsrv_url == ""
    assert "DDNS, finished" in knot.log.read_text()
    assert await knot.txt(CHALLENGE) == []


async def test_a_wrong_tsig_secret_fails_the_order_with_the_servers_answer(
    knot_nodes: Nodes, knot: Knot, tmp_path: Path
) -> None:
    other = write_secret(tmp_path / "other.secret", "c2VjcmV0LW9mLWFub3RoZXIta2V5LTMyLWJ5dGVz\n")
    gw = await keeper(knot_nodes, knot.config(tsig_secret_file=str(other)))
    await add(gw.view.store, knot_nodes.pebble)
    assert await gw.reconcile_once() == []

    events = await events_on(gw.view.store, domain_subject(CLUSTER, DOMAIN))
    assert count(events, CertificateIssued) == 0
    (failed,) = [e for e in events if isinstance(e, CertificateRenewalFailed)]
    assert "NOTAUTH (BADSIG" in failed.error and "\n" not in failed.error
    assert await knot.txt(CHALLENGE) == []


async def test_values_are_added_and_removed_one_by_one(knot: Knot) -> None:
    dns = knot.config().open()
    await dns.add_txt(CHALLENGE, "wildcard-digest")
    await dns.add_txt(CHALLENGE.rstrip("."), "base-digest")  # relative to the root either way
    assert await knot.txt(CHALLENGE) == ["base-digest", "wildcard-digest"]
    await dns.remove_txt(CHALLENGE, "wildcard-digest")
    assert await knot.txt(CHALLENGE) == ["base-digest"]
    await dns.remove_txt(CHALLENGE, "base-digest")
    await dns.remove_txt(CHALLENGE, "base-digest")  # already gone: not an error
    assert await knot.txt(CHALLENGE) == []


@pytest.mark.parametrize(
    ("change", "answer"),
    [
        ({"tsig_name": "not-the-key."}, "NOTAUTH (BADKEY"),
        ({"tsig_algorithm": "hmac-sha512"}, "NOTAUTH (BADKEY"),
    ],
)
async def test_a_key_the_server_does_not_know_is_refused_in_one_line(
    knot: Knot, change: dict[str, str], answer: str
) -> None:
    dns = knot.config(**change).open()
    with pytest.raises(DnsError) as err:
        await dns.add_txt(CHALLENGE, "v")
    assert answer in str(err.value) and knot.address in str(err.value)
    assert "\n" not in str(err.value)
    assert await knot.txt(CHALLENGE) == []


async def test_the_key_updates_txt_records_only(knot: Knot) -> None:
    """knotd's ACL (update-type TXT) answers an A record update with NOTAUTH: what a stolen
    key can change is the operator's server configuration to limit; we report its answer."""
    import dns.rdata
    import dns.update

    provider = knot.config().open()
    update = dns.update.UpdateMessage(provider.zone)
    update.add(f"www.{DOMAIN}.", 60, dns.rdata.from_text("IN", "A", "127.0.0.9"))
    with pytest.raises(DnsError, match="NOTAUTH"):
        await provider._send(update, "add A")


async def test_a_zone_the_server_does_not_serve_is_named_with_its_answer(knot: Knot) -> None:
    dns = knot.config(zone="example.org.").open()
    with pytest.raises(DnsError, match="the server answered NOTAUTH without a valid TSIG"):
        await dns.add_txt("_acme-challenge.example.org.", "v")


async def test_a_name_outside_the_zone_is_refused_before_anything_is_sent(knot: Knot) -> None:
    dns = knot.config().open()
    with pytest.raises(DnsError, match=r"_acme-challenge.example.org. is not in .* example.com."):
        await dns.add_txt("_acme-challenge.example.org.", "v")
    with pytest.raises(DnsError, match="is not a DNS name"):  # a label over 63 octets
        await dns.add_txt(f"_acme-challenge.{'a' * 64}.example.com.", "v")


async def test_a_server_that_does_not_answer_times_out_in_bounded_time(tmp_path: Path) -> None:
    """A listener that accepts and never answers (a firewalled or wedged primary)."""
    secret = write_secret(tmp_path / "s", "c2VjcmV0LW9mLWFub3RoZXIta2V5LTMyLWJ5dGVz\n")
    conns: list[asyncio.StreamWriter] = []

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(w)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = Rfc2136Config(f"127.0.0.1:{port}", "example.com", "k.", "hmac-sha256", str(secret),
                           timeout_s=0.5)  # fmt: skip
    async with server:
        start = time.monotonic()
        with pytest.raises(DnsError, match=r"no answer within 0.5 s"):
            await config.open().add_txt(CHALLENGE, "v")
        assert time.monotonic() - start < 2
        for w in conns:
            w.close()


async def test_a_server_that_is_down_is_named_in_one_line(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "s", "c2VjcmV0LW9mLWFub3RoZXIta2V5LTMyLWJ5dGVz\n")
    port = free_port()  # nothing listens there
    config = Rfc2136Config(f"127.0.0.1:{port}", "example.com", "k.", "hmac-sha256", str(secret))
    with pytest.raises(DnsError, match=rf"127.0.0.1:{port}: .*[Rr]efused") as err:
        await config.open().add_txt(CHALLENGE, "v")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("server", "secret", "mode", "error"),
    [
        ("127.0.0.1:53", "c2VjcmV0LW9mLWFub3RoZXIta2V5LTMyLWJ5dGVz", 0o644, "readable by others"),
        ("127.0.0.1:53", "not base64 at all!", 0o600, "expected the key's base64 secret"),
        ("127.0.0.1:53", "c2hvcnQ=", 0o600, "16 bytes or more"),
        ("127.0.0.1:99999", "c2VjcmV0LW9mLWFub3RoZXIta2V5LTMyLWJ5dGVz", 0o600, "HOST:PORT"),
    ],
)
def test_unusable_options_are_refused_when_the_provider_is_built(
    tmp_path: Path, server: str, secret: str, mode: int, error: str
) -> None:
    path = tmp_path / "tsig.secret"
    path.write_text(secret + "\n")
    path.chmod(mode)
    with pytest.raises(DnsError, match=error):
        Rfc2136Config(server, "example.com", "k.", "hmac-sha256", str(path)).open()


def test_server_addresses_take_ports_and_ipv6() -> None:
    from pydstack.adapters.acme.rfc2136 import split_server

    assert split_server("ns1.example.com") == ("ns1.example.com", 53)
    assert split_server("192.0.2.1:5353") == ("192.0.2.1", 5353)
    assert split_server("[2001:db8::1]:5300") == ("2001:db8::1", 5300)
    assert split_server("2001:db8::1") == ("2001:db8::1", 53)


def test_the_cli_offers_the_algorithms_the_adapter_takes() -> None:
    assert TSIG_ALGORITHMS == ALGORITHMS


def test_rfc2136_is_the_default_provider_when_a_node_has_both(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "s", os.urandom(32).hex()[:44] + "\n")
    config = Rfc2136Config("127.0.0.1", "example.com", "k.", "hmac-sha256", str(secret))
    both = dns_providers("http://127.0.0.1:8055", config)
    assert isinstance(both[""], Rfc2136Dns) and both[""] is both["rfc2136"]
    assert dns_providers("http://127.0.0.1:8055")[""] is not None
    assert dns_providers() == {}


def test_port_is_free_for_udp_and_tcp() -> None:
    from .knot import free_dns_port

    port = free_dns_port()
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", port))


async def test_an_unsigned_noerror_answer_is_not_taken_for_success(tmp_path: Path) -> None:
    """Whoever answers in the server's place (on-path, or a spoofed address) without the key
    cannot make the node believe a record was published: the answer must carry its TSIG."""
    import struct

    import dns.flags
    import dns.message
    import dns.update

    async def forger(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        (n,) = struct.unpack("!H", await r.readexactly(2))
        request = dns.message.from_wire(await r.readexactly(n), keyring=False)  # has no key
        assert isinstance(request, dns.update.UpdateMessage)
        answer = dns.update.UpdateMessage(request.zone[0].name, id=request.id)
        answer.flags |= dns.flags.QR  # NOERROR, the same zone, no TSIG
        wire = answer.to_wire()
        w.write(struct.pack("!H", len(wire)) + wire)
        await w.drain()
        w.close()

    secret = write_secret(tmp_path / "s", "c2VjcmV0LW9mLWFub3RoZXIta2V5LTMyLWJ5dGVz\n")
    server = await asyncio.start_server(forger, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = Rfc2136Config(f"127.0.0.1:{port}", "example.com", "k.", "hmac-sha256", str(secret))
    async with server:
        with pytest.raises(DnsError, match="answered NOERROR without a valid TSIG signature"):
            await config.open().add_txt(CHALLENGE, "v")
