"""RA-TLS: key binding is enforced, and two agents' certificates do mutual RA-TLS over aiohttp."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.adapters.ports import free_port as _free_port
from pydstack.adapters.tdx.collateral import Collateral
from pydstack.adapters.tdx.ratls import (
    OID_ATTESTATION,
    build_ratls_cert,
    check_ratls_cert,
    extract_attestation,
    issue_ratls_cert,
    ratls_report_data,
)
from pydstack.adapters.tdx.ratls_tls import (
    RATLS_PEER,
    RaTlsConnector,
    RaTlsPeerRefused,
    RaTlsVerifier,
    client_ssl_context,
    ratls_middleware,
    server_ssl_context,
)

from .conftest import APP_ID, Guest


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


async def test_cert_whose_quote_binds_another_key_is_refused(guest: Guest) -> None:
    """Evidence bound to key A, placed in a certificate for key B, is refused with a reason."""
    _key_a, cert_a = await issue_ratls_cert(
        guest.agent, not_before=guest.now - 60, not_after=guest.now + 3600
    )
    good = check_ratls_cert(
        _der(cert_a), guest.collateral, now=guest.now, root_ca_der=guest.pki.root_der
    )
    assert good.ok, good.reasons
    key_b = ec.generate_private_key(ec.SECP256R1())
    stolen = build_ratls_cert(
        key_b,
        extract_attestation(cert_a),
        subject="thief",
        not_before=guest.now - 60,
        not_after=guest.now + 3600,
    )
    bad = check_ratls_cert(
        _der(stolen), guest.collateral, now=guest.now, root_ca_der=guest.pki.root_der
    )
    assert not bad.ok
    assert any("does not bind the certificate key" in r for r in bad.reasons)


async def test_legacy_extensions_are_read(guest: Guest) -> None:
    """A certificate with only the pre-1.8 quote + event-log extensions still verifies."""
    key = ec.generate_private_key(ec.SECP256R1())
    att = await guest.agent.attest(ratls_report_data(key.public_key()))
    cert = build_ratls_cert(
        key,
        att,
        subject="legacy",
        legacy_extensions=True,
        not_before=guest.now - 60,
        not_after=guest.now + 3600,
    )
    # Strip the 1.8 extension by rebuilding without it: read the legacy pair only.
    exts = [e for e in cert.extensions if e.oid != OID_ATTESTATION]
    b = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for e in exts:
        b = b.add_extension(e.value, e.critical)
    legacy = b.sign(key, hashes.SHA256())
    r = check_ratls_cert(
        _der(legacy), guest.collateral, now=guest.now, root_ca_der=guest.pki.root_der
    )
    assert r.ok, r.reasons


async def _tls_pair(guest: Guest, *, ra: bool) -> tuple[str, str]:
    out = await guest.agent.tls_key(
        guest.agent.fresh_tls_key(),
        subject="peer",
        alt_names=[],
        usage_ra_tls=ra,
        usage_server_auth=True,
        usage_client_auth=True,
    )
    return "".join(out["certificate_chain"]), out["key"]


@pytest.mark.timeout(60)
async def test_mutual_ratls_over_aiohttp(guest: Guest) -> None:
    """Server and client both check the peer's attestation; a non-RA client gets 403."""
    coll: Collateral = guest.collateral

    async def source(_quote: bytes) -> Collateral:
        return coll

    verifier = RaTlsVerifier(source, root_ca_der=guest.pki.root_der)
    ca = guest.keys.ca_cert_pem
    server_chain, server_key = await _tls_pair(guest, ra=True)
    client_chain, client_key = await _tls_pair(guest, ra=True)
    plain_chain, plain_key = await _tls_pair(guest, ra=False)

    async def hello(request: web.Request) -> web.Response:
        peer = request[RATLS_PEER]
        assert peer.app_info is not None
        return web.json_response({"peer_app_id": peer.app_info.app_id.hex()})

    app = web.Application(middlewares=[ratls_middleware(verifier)])
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(
        runner, "127.0.0.1", port, ssl_context=server_ssl_context(server_chain, server_key, ca)
    ).start()
    try:
        conn = RaTlsConnector(verifier, ssl=client_ssl_context(client_chain, client_key, ca))
        async with aiohttp.ClientSession(connector=conn) as s:
            async with s.get(f"https://127.0.0.1:{port}/hello") as resp:
                assert resp.status == 200
                assert (await resp.json())["peer_app_id"] == APP_ID.hex()
        conn = RaTlsConnector(verifier, ssl=client_ssl_context(plain_chain, plain_key, ca))
        async with aiohttp.ClientSession(connector=conn) as s:
            async with s.get(f"https://127.0.0.1:{port}/hello") as resp:
                assert resp.status == 403
                assert "no RA-TLS attestation" in " ".join((await resp.json())["reasons"])
    finally:
        await runner.cleanup()

    # A server without evidence is refused by the client before any request is sent.
    app2 = web.Application()
    app2.router.add_get("/hello", hello)
    runner2 = web.AppRunner(app2)
    await runner2.setup()
    port2 = _free_port()
    await web.TCPSite(
        runner2, "127.0.0.1", port2, ssl_context=server_ssl_context(plain_chain, plain_key, ca)
    ).start()
    try:
        conn = RaTlsConnector(verifier, ssl=client_ssl_context(client_chain, client_key, ca))
        async with aiohttp.ClientSession(connector=conn) as s:
            with pytest.raises(RaTlsPeerRefused):
                await s.get(f"https://127.0.0.1:{port2}/hello")
    finally:
        await runner2.cleanup()
