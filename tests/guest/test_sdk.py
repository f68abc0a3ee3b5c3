"""The unchanged PyPI dstack-sdk client on our agent's socket; our verifier checks results."""

from __future__ import annotations

import asyncio
import hashlib
import json

import aiohttp
import pytest
from coincurve import PublicKey
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from dstack_sdk import AsyncDstackClient, DstackClient

from pydstack.adapters.tdx.attestation import decode_attestation
from pydstack.adapters.tdx.eventlog import parse_json_event_log, replay_rtmrs
from pydstack.adapters.tdx.quote import parse_quote
from pydstack.adapters.tdx.ratls import check_attestation, check_ratls_cert
from pydstack.adapters.tdx.verify import Policy, verify_quote
from pydstack_guest.keys import key_public, verify_key_chain

from .conftest import APP_ID, INSTANCE_ID, OS_IMAGE_HASH, Guest
from .tlscheck import TlsOptions, check_tls_key, option_matrix


def _verify(g: Guest, quote: bytes, event_log: str) -> list[str]:
    verdict = verify_quote(
        quote,
        g.collateral,
        Policy(),
        g.now,
        g.pki.root_der,
        event_log=parse_json_event_log(event_log),
    )
    return list(verdict.reasons)


async def test_get_quote_verifies_and_replays(guest: Guest) -> None:
    """GetQuote pads report_data, and its quote verifies under the dev root with its log."""
    async with AsyncDstackClient(guest.dstack_sock) as c:
        r = await c.get_quote(b"nonce-123")
    quote = r.decode_quote()
    assert _verify(guest, quote, r.event_log) == []
    assert parse_quote(quote).report.report_data == b"nonce-123".ljust(64, b"\x00")
    assert bytes.fromhex(r.report_data) == b"nonce-123".ljust(64, b"\x00")
    # The SDK's own replay agrees with the quote too (full digests in the log).
    rtmrs = parse_quote(quote).report.rtmrs
    assert [bytes.fromhex(v) for v in r.replay_rtmrs().values()] == list(rtmrs)


async def test_production_root_refuses_simulated_quote(guest: Guest) -> None:
    """Without the dev root (production config) the simulator's quote is not trusted."""
    async with AsyncDstackClient(guest.dstack_sock) as c:
        r = await c.get_quote(b"x")
    verdict = verify_quote(r.decode_quote(), guest.collateral, Policy(), guest.now)
    assert not verdict.ok


async def test_info_reports_identity_and_tcb(guest: Guest) -> None:
    """Info's tcb_info JSON carries RTMRs equal to a fresh quote's and a log that replays."""
    async with AsyncDstackClient(guest.dstack_sock) as c:
        info = await c.info()
        q = await c.get_quote(b"i")
    assert info.app_id == APP_ID.hex()
    assert info.instance_id == INSTANCE_ID.hex()
    assert info.os_image_hash == OS_IMAGE_HASH.hex()
    assert json.loads(info.key_provider_info)["name"] == "local-sgx"  # dstack v0.5.11's name
    tcb = info.tcb_info
    report = parse_quote(q.decode_quote()).report
    assert tcb.mrtd == report.mr_td.hex()
    assert [tcb.rtmr0, tcb.rtmr1, tcb.rtmr2, tcb.rtmr3] == [r.hex() for r in report.rtmrs]
    events = parse_json_event_log(json.dumps([e.model_dump() for e in tcb.event_log]))
    assert replay_rtmrs(events) == report.rtmrs


@pytest.mark.parametrize("algorithm", ["secp256k1", "ed25519", "k256"])
async def test_get_key_signature_chain_reaches_kms_root(guest: Guest, algorithm: str) -> None:
    """GetKey's chain: app key signs purpose:pubkey, the KMS root signs the app key."""
    async with AsyncDstackClient(guest.dstack_sock) as c:
        r = await c.get_key("wallet/eth", "signing", algorithm)
        again = await c.get_key("wallet/eth", "signing", algorithm)
        other = await c.get_key("wallet/other", "signing", algorithm)
    assert r.key == again.key and r.key != other.key  # deterministic per path
    pub = key_public(r.decode_key(), algorithm)
    chain = r.decode_signature_chain()
    assert verify_key_chain(pub, "signing", chain, APP_ID, guest.keys.kms_root_public) == []
    assert verify_key_chain(pub, "other", chain, APP_ID, guest.keys.kms_root_public) != []


async def test_get_key_refuses_unknown_algorithm_naming_field(guest: Guest) -> None:
    """An algorithm dstack refuses is a 400 that names the `algorithm` field."""
    conn = aiohttp.UnixConnector(path=guest.dstack_sock)
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.post("http://localhost/GetKey", json={"algorithm": "rsa"}) as resp:
            body = await resp.json()
            assert resp.status == 400 and body["field"] == "algorithm"
        async with s.post("http://localhost/GetQuote", json={"report_data": "00" * 65}) as resp:
            body = await resp.json()
            assert resp.status == 400 and body["field"] == "report_data"
        async with s.post("http://localhost/GetQuote", json={"report_data": "zz"}) as resp:
            assert resp.status == 400 and (await resp.json())["field"] == "report_data"
        async with s.post("http://localhost/GetTlsKey", json={"usage_ra_tls": "yes"}) as resp:
            assert resp.status == 400 and (await resp.json())["field"] == "usage_ra_tls"


async def test_sign_and_verify_all_algorithms(guest: Guest) -> None:
    """Sign gives signatures that independent libraries accept; Verify agrees and rejects."""
    digest = hashlib.sha256(b"msg").digest()
    async with AsyncDstackClient(guest.dstack_sock) as c:
        k1 = await c.sign("secp256k1", b"msg")
        ed = await c.sign("ed25519", b"msg")
        pre = await c.sign("secp256k1_prehashed", digest)
        for r, data, algo in (
            (k1, b"msg", "secp256k1"),
            (ed, b"msg", "ed25519"),
            (pre, digest, "secp256k1_prehashed"),
        ):
            assert (await c.verify(algo, data, r.decode_signature(), r.decode_public_key())).valid
            assert not (
                await c.verify(
                    algo,
                    b"other" * 7 if algo != "secp256k1_prehashed" else bytes(32),
                    r.decode_signature(),
                    r.decode_public_key(),
                )
            ).valid
            chain = r.decode_signature_chain()
            assert chain[0] == r.decode_signature() and len(chain) == 3
            assert (
                verify_key_chain(
                    r.decode_public_key(), "signing", chain[1:], APP_ID, guest.keys.kms_root_public
                )
                == []
            )
    ed25519.Ed25519PublicKey.from_public_bytes(ed.decode_public_key()).verify(
        ed.decode_signature(), b"msg"
    )
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), k1.decode_public_key())
    sig = k1.decode_signature()
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    pub.verify(der, b"msg", ec.ECDSA(hashes.SHA256()))
    assert PublicKey(pre.decode_public_key()).verify(
        encode_dss_signature(
            int.from_bytes(pre.decode_signature()[:32], "big"),
            int.from_bytes(pre.decode_signature()[32:], "big"),
        ),
        digest,
        hasher=None,
    )


async def test_get_tls_key_gives_ratls_cert_from_app_ca(guest: Guest) -> None:
    """GetTlsKey: fresh PKCS#8 key, leaf issued by the app CA, RA-TLS evidence bound to it."""
    async with AsyncDstackClient(guest.dstack_sock) as c:
        r = await c.get_tls_key(subject="web.local", alt_names=["web.local"], usage_ra_tls=True)
        r2 = await c.get_tls_key(subject="web.local")
    key = serialization.load_pem_private_key(r.key.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert r.as_uint8array() != r2.as_uint8array()  # fresh key each call
    leaf = x509.load_pem_x509_certificate(r.certificate_chain[0].encode())
    ca = x509.load_pem_x509_certificate(r.certificate_chain[1].encode())
    assert leaf.public_key() == key.public_key()
    leaf.verify_directly_issued_by(ca)
    der = leaf.public_bytes(serialization.Encoding.DER)
    result = check_ratls_cert(der, guest.collateral, now=guest.now, root_ca_der=guest.pki.root_der)
    assert result.reasons == () and result.ok
    assert result.app_info is not None and result.app_info.app_id == APP_ID
    # Without usage_ra_tls there is no evidence, and the check says so.
    plain = x509.load_pem_x509_certificate(r2.certificate_chain[0].encode())
    res2 = check_ratls_cert(
        plain.public_bytes(serialization.Encoding.DER),
        guest.collateral,
        now=guest.now,
        root_ca_der=guest.pki.root_der,
    )
    assert not res2.ok and "no RA-TLS attestation" in res2.reasons[0]


async def test_attest_returns_verifiable_scale_attestation(guest: Guest) -> None:
    """Attest's bytes decode as dstack's SCALE V0 attestation and verify with our verifier."""
    async with AsyncDstackClient(guest.dstack_sock) as c:
        r = await c.attest(b"attest-me")
    att = decode_attestation(r.decode_attestation())
    assert att.report_data == b"attest-me".ljust(64, b"\x00")
    reasons, status, _quote, info = check_attestation(
        att, guest.collateral, now=guest.now, root_ca_der=guest.pki.root_der
    )
    assert reasons == [] and status == "UpToDate"
    assert info is not None and info.os_image_hash == OS_IMAGE_HASH


async def test_emit_event_extends_rtmr3_and_log(guest: Guest) -> None:
    """EmitEvent appends a runtime event; later quotes still replay and show it."""
    async with AsyncDstackClient(guest.dstack_sock) as c:
        before = await c.get_quote(b"a")
        await c.emit_event("my-event", b"payload")
        after = await c.get_quote(b"b")
    assert _verify(guest, after.decode_quote(), after.event_log) == []
    last = parse_json_event_log(after.event_log)[-1]
    assert (last.imr, last.event, last.event_payload) == (3, "my-event", b"payload")
    assert (
        parse_quote(before.decode_quote()).report.rtmr3
        != parse_quote(after.decode_quote()).report.rtmr3
    )


async def test_concurrent_emits_and_quotes_all_replay(guest: Guest) -> None:
    """50 concurrent EmitEvent + GetQuote pairs: every quote replays to its own log."""
    async with AsyncDstackClient(guest.dstack_sock, timeout=30) as c:

        async def one(i: int) -> tuple[bytes, str]:
            await c.emit_event(f"evt-{i}", str(i).encode())
            q = await c.get_quote(f"q{i}".encode())
            return q.decode_quote(), q.event_log

        results = await asyncio.gather(*(one(i) for i in range(50)))
    for quote, log in results:
        assert _verify(guest, quote, log) == []
    final = parse_json_event_log(results[-1][1])
    names = {e.event for e in guest.backend.event_log() if e.event.startswith("evt-")}
    assert names == {f"evt-{i}" for i in range(50)}
    assert len(final) >= len(final)  # every log is a prefix-consistent snapshot (checked above)


async def test_version_and_sync_client(guest: Guest) -> None:
    """The sync DstackClient works too (run in a thread: it blocks)."""
    c = DstackClient(guest.dstack_sock)
    v = await asyncio.to_thread(c.version)
    assert v.version
    assert await asyncio.to_thread(c.is_reachable)
    q = await asyncio.to_thread(c.get_quote, b"sync")
    assert _verify(guest, q.decode_quote(), q.event_log) == []


async def test_get_tls_key_defaults_and_every_option_combination(guest: Guest) -> None:
    """GetTlsKey answers a valid key and chain for the SDK's default arguments (an empty
    subject: once an HTTP 500) and for every combination of its options; IP alt_names are
    IP SANs."""
    async with AsyncDstackClient(guest.dstack_sock) as c:
        r = await c.get_tls_key()
        check_tls_key(r.key, r.certificate_chain, TlsOptions(), chain_len=2)
        for o in option_matrix(guest.now):
            r = await c.get_tls_key(
                subject=o.subject, alt_names=list(o.alt_names), usage_ra_tls=o.usage_ra_tls,
                usage_server_auth=o.usage_server_auth, usage_client_auth=o.usage_client_auth,
                with_app_info=o.with_app_info, not_before=o.not_before, not_after=o.not_after,
            )  # fmt: skip
            check_tls_key(r.key, r.certificate_chain, o, chain_len=2)


async def test_info_app_cert_is_an_ratls_client_cert_of_the_app(guest: Guest) -> None:
    """Info's app_cert is dstack's demo certificate: CN demo-cert, client auth, RA-TLS
    evidence of this app, issued by the app CA; the same one on every call."""
    async with AsyncDstackClient(guest.dstack_sock) as c:
        first = (await c.info()).app_cert
        again = (await c.info()).app_cert
    assert first and first == again
    pems = [p + "-----END CERTIFICATE-----\n" for p in first.split("-----END CERTIFICATE-----")]
    certs = [x509.load_pem_x509_certificate(p.encode()) for p in pems[:-1]]
    assert len(certs) == 2
    leaf = certs[0]
    leaf.verify_directly_issued_by(certs[1])
    assert leaf.subject.rfc4514_string() == "CN=demo-cert"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    der = leaf.public_bytes(serialization.Encoding.DER)
    result = check_ratls_cert(der, guest.collateral, now=guest.now, root_ca_der=guest.pki.root_der)
    assert result.ok and result.app_info is not None and result.app_info.app_id == APP_ID


async def test_get_tls_key_refuses_non_ascii_alt_names_naming_the_field(guest: Guest) -> None:
    """A DNS SAN is ASCII: a non-ASCII alt name is a 400 naming alt_names, not a 500."""
    conn = aiohttp.UnixConnector(path=guest.dstack_sock)
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.post("http://localhost/GetTlsKey", json={"alt_names": ["é.example"]}) as r:
            assert r.status == 400 and (await r.json())["field"] == "alt_names"
