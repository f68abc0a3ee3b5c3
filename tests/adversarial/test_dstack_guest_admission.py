"""dstack v0.5.11 guests at our KMS and gateway (issue 16 item 3), and what an attacker can
do with the same shapes.

A v0.5.11 guest (dstack-util `system_setup.rs`) asks GetAppKey with `generate_ra_cert`'s
certificate (rcgen's 1975 notBefore, a stripped log: `tests/kms/dstack_guest.py`), then
registers at ``/prpc/RegisterCvm?json`` with a SignCert certificate asked for
``ext_app_info`` only (no quote); on an answer containing "no attestation provided" it
retries with the one asked for ``ext_quote`` too. The notBefore is no freshness proof (the
temp CA's key is public): evidence is current because its key is held by the TLS peer and
its quote is judged against today's collateral (docs/threat-model.md, "RA-TLS freshness").

Everything is real but the TDX hardware: nats-server, the KMS on TLS with its webhook
backend, RegisterCvm on mutual TLS, simulated TDs of the dev PKI."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.actors.gateway import Registrar, RegistrarConfig
from pydstack.actors.gateway.node_launch import RegistrationLaunch, _client_chain
from pydstack.actors.gateway.registration import (
    RegistrationConfig,
    registration_app,
    serve_registration,
)
from pydstack.actors.kms import KmsCallError
from pydstack.adapters.nats import EventStore
from pydstack.adapters.tdx.attestation import encode_attestation
from pydstack.adapters.tdx.identity import AppInfo
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import (
    OID_APP_INFO,
    app_info_of,
    build_ratls_cert,
    ratls_report_data,
)
from pydstack.adapters.tdx.ratls_tls import client_ssl_context, server_ssl_context
from pydstack.core.events import (
    CvmRegistered,
    GatewayNodeJoined,
    KeyDenied,
    PortAttrs,
    decode_body,
    open_envelope,
)
from pydstack.core.kms import CertConfig
from pydstack_guest.cert_client import signed_csr
from pydstack_guest.gateway_client import GatewayRegistrationError, register_cvm
from tests.gateway.given import key as wg_key
from tests.gateway.simcvm import DevCa, SimCvm
from tests.gateway.test_registration import _dev_verifier
from tests.kms.conftest import APP_ID, VM_CONFIG, Cvm, Kms, kms, make_cvm, pki, webhook
from tests.kms.dstack_guest import RCGEN_NOT_BEFORE, generate_ra_cert, key_pem

__all__ = ["kms", "pki", "webhook"]  # fixtures of the KMS rig

CERT_VALIDITY_SECS = 10 * 24 * 3600  # dstack-util system_setup.rs


async def get_app_key(kms: Kms, identity: tuple[str, str]) -> dict[str, object]:
    async with kms.client(identity) as c:
        return await c.call("GetAppKey", {"api_version": 1, "vm_config": VM_CONFIG})


async def refused(kms: Kms, identity: tuple[str, str]) -> KmsCallError:
    with pytest.raises(KmsCallError) as info:
        await get_app_key(kms, identity)
    assert info.value.status == 403
    return info.value


async def test_a_stripped_log_with_a_rewritten_runtime_event_is_refused(
    kms: Kms, pki: DevPki
) -> None:
    """The stripped form is replayed to RTMR3: a compose-hash event rewritten after quoting
    (in the log and the runtime events) does not replay, and leaves nothing on the log."""
    cvm = make_cvm(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    att = await cvm.attest(ratls_report_data(key.public_key()))
    evil = hashlib.sha256(b"evil compose").digest()
    log = tuple(msgspec.structs.replace(e, event_payload=evil) if e.event == "compose-hash"
                else e for e in att.event_log)  # fmt: skip
    runtime = tuple(msgspec.structs.replace(e, payload=evil) if e.event == "compose-hash"
                    else e for e in att.runtime_events)  # fmt: skip
    forged = msgspec.structs.replace(att, event_log=log, runtime_events=runtime)
    before = len(await kms.events())
    err = await refused(kms, generate_ra_cert(kms.temp, forged, key))
    assert "RTMR3 mismatch" in err.error and "stripped certificate log" in err.error
    assert len(await kms.events()) == before


async def test_an_old_dstack_shaped_certificate_proves_nothing_without_its_key(
    kms: Kms, pki: DevPki
) -> None:
    """A genuine quote lifted from a dstack guest's certificate (they are public: every TLS
    handshake shows one) into a 1975-dated certificate for the thief's key is refused: the
    quote binds the victim's key, and only its holder completes TLS with it."""
    cvm = make_cvm(pki)
    victim = ec.generate_private_key(ec.SECP256R1())
    att = await cvm.attest(ratls_report_data(victim.public_key()))
    thief = ec.generate_private_key(ec.SECP256R1())
    err = await refused(kms, generate_ra_cert(kms.temp, att, thief))
    assert "does not bind the certificate key" in err.error


async def test_without_a_not_before_window_todays_collateral_still_refuses_an_old_tcb(
    kms: Kms, pki: DevPki
) -> None:
    """What the notBefore window never gave and the collateral does: a 1975-dated
    certificate from a platform whose TCB is out of date today is refused, a decision on
    the log."""
    kms.collateral.status = "OutOfDate"
    cvm = make_cvm(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    att = await cvm.attest(ratls_report_data(key.public_key()))
    cert = x509.load_pem_x509_certificate(generate_ra_cert(kms.temp, att, key)[0].encode())
    assert int(cert.not_valid_before_utc.timestamp()) == RCGEN_NOT_BEFORE
    err = await refused(kms, generate_ra_cert(kms.temp, att, key))
    assert "tcb status OutOfDate not accepted" in err.error
    assert isinstance((await kms.events())[-1], KeyDenied)


# --- the gateway ---


async def dstack_gateway_certs(kms: Kms, cvm: Cvm) -> tuple[tuple[str, str], tuple[str, str]]:
    """dstack-util's `get_or_generate_key_store`: one key, two SignCert chains (CertConfigV2
    subject "dstack-guest-agent", client auth, ext_app_info; the second with ext_quote too),
    the CSR's attestation unstripped (`Attestation::quote(..).into_versioned()`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    att = encode_attestation(await cvm.attest(ratls_report_data(key.public_key())))
    out = []
    for ext_quote in (False, True):
        config = CertConfig(subject="dstack-guest-agent", usage_client_auth=True,
                            ext_quote=ext_quote, ext_app_info=True,
                            not_after=int(time.time()) + CERT_VALIDITY_SECS)  # fmt: skip
        raw, sig = signed_csr(key, config, att)
        body = {"api_version": 2, "csr": raw.hex(), "signature": sig.hex(), "vm_config": VM_CONFIG}
        async with kms.client() as c:
            chain = (await c.call("SignCert", body))["certificate_chain"]
        assert isinstance(chain, list)
        out.append(("\n".join(chain), key_pem(key)))  # dstack-util: certs.join("\n")
    return out[0], out[1]


@dataclass
class Gw:
    url: str
    ca: DevCa
    store: EventStore

    async def post(self, path: str, identity: tuple[str, str], body: Any) -> tuple[int, Any]:
        ssl = client_ssl_context(identity[0], identity[1], self.ca.pem)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl)) as s:
            data = body if isinstance(body, bytes) else json.dumps(body)
            async with s.post(self.url + path, data=data) as resp:
                return resp.status, await resp.json()

    async def registered(self) -> list[CvmRegistered]:
        out = [decode_body(open_envelope(r.data)) async for r in self.store.read()]
        return [e for e in out if isinstance(e, CvmRegistered)]


@contextlib.asynccontextmanager
async def gateway(
    store: EventStore, kms: Kms, pki: DevPki, *, require_quote: bool = False
) -> AsyncIterator[Gw]:
    """RegisterCvm as a node serves it: TLS trusts the KMS root, the handler admits only its
    SignCert chains (`node_launch._client_chain`)."""
    registrar = Registrar(store, RegistrarConfig(node_id="gw1"))
    await registrar.join(GatewayNodeJoined(
        node_id="gw1", wg_public_key=wg_key(500), tunnel_ip="10.0.0.129",
        endpoint="192.0.2.1:51820", base_domain="gw.example.com", url="https://gw1:8011",
    ))  # fmt: skip
    check = await _client_chain(
        store, "gw1", RegistrationLaunch("", "", kms.svc.created.ca_cert_pem)
    )
    cfg = RegistrationConfig(node_id="gw1", require_quote=require_quote)
    app = registration_app(registrar, _dev_verifier(pki), cfg, client_chain=check)
    ca = DevCa.create()
    chain, key = await SimCvm(pki, bytes(20), b"\xee" * 20, b"gateway").identity(ca)
    runner = await serve_registration(
        app, "127.0.0.1", 0, server_ssl_context(chain, key, check.roots_pem)
    )
    try:
        yield Gw(f"https://127.0.0.1:{runner.addresses[0][1]}", ca, store)
    finally:
        await runner.cleanup()
        await registrar.aclose()


@pytest.mark.timeout(90)
async def test_a_dstack_guest_registers_with_its_kms_signed_app_info_certificate(
    store: EventStore, kms: Kms, pki: DevPki
) -> None:
    """v0.5.11's first try (no quote, the KMS's AppInfo) is admitted at ``/prpc/RegisterCvm``
    with its port policy honoured; the identity is the KMS-signed one."""
    cvm = make_cvm(pki, instance_id=b"\x41" * 20)
    app_info_cert, _ = await dstack_gateway_certs(kms, cvm)
    leaf = x509.load_pem_x509_certificate(app_info_cert[0].encode())
    stated = app_info_of(leaf)
    assert stated is not None and stated.app_id == APP_ID
    # v0.5.11's eight-field AppInfo (a MessagePack fixarray of 8), which its gateway can read
    ext = leaf.extensions.get_extension_for_oid(OID_APP_INFO).value
    assert isinstance(ext, x509.UnrecognizedExtension)
    header = 2 + (ext.value[1] & 0x7F if ext.value[1] & 0x80 else 0)  # DER OCTET STRING
    assert ext.value[header] == 0x98
    policy = {"ports": [{"port": 443, "pp": True}], "restrict_mode": True}
    body = {"client_public_key": wg_key(1), "port_policy": policy}
    async with gateway(store, kms, pki) as gw:
        # prpc's protobuf mode (no `?json`): RegisterCvmRequest field 1, a string; JSON only
        key = wg_key(1).encode()
        proto = b"\x0a" + bytes([len(key)]) + key
        status, out = await gw.post("/prpc/RegisterCvm", app_info_cert, proto)
        assert (status, out["code"]) == (400, "bad_request"), out
        status, out = await gw.post("/prpc/RegisterCvm?json", app_info_cert, body)
        assert status == 200, out
        assert out["wg"]["client_ip"] and out["wg"]["servers"][0]["pk"] == wg_key(500)
        (reg,) = await gw.registered()
    assert (reg.app_id, reg.instance_id) == (APP_ID.hex(), (b"\x41" * 20).hex())
    assert reg.port_policy == "restrict" and reg.ports == (PortAttrs(port=443, pp=True),)


@pytest.mark.timeout(90)
async def test_a_gateway_requiring_quotes_says_no_attestation_and_the_guest_retries(
    store: EventStore, kms: Kms, pki: DevPki
) -> None:
    """With ``require_quote``, the app-info certificate is answered "no attestation
    provided" (nothing appended); our guest's client, given the quote certificate as dstack's
    is, retries with it and registers, at dstack's path and with its port policy."""
    cvm = make_cvm(pki, instance_id=b"\x42" * 20)
    app_info_cert, quote_cert = await dstack_gateway_certs(kms, cvm)
    async with gateway(store, kms, pki, require_quote=True) as gw:
        before = await store.last_seq()
        status, out = await gw.post("/prpc/Tproxy.RegisterCvm", app_info_cert,
                                    {"client_public_key": wg_key(2)})  # fmt: skip
        assert status == 403 and "no attestation provided" in out["error"], out
        assert await store.last_seq() == before
        with pytest.raises(GatewayRegistrationError, match="no attestation provided"):
            await register_cvm(gw.url, identity=app_info_cert, ca_pem=gw.ca.pem,
                               wg_public_key=wg_key(2))  # fmt: skip
        reg = await register_cvm(gw.url, identity=app_info_cert, ca_pem=gw.ca.pem,
                                 wg_public_key=wg_key(2), ports=[{"port": 8080, "pp": False}],
                                 restrict=True, quoted_identity=quote_cert)  # fmt: skip
        assert reg.client_ip
        (done,) = await gw.registered()
    assert done.instance_id == (b"\x42" * 20).hex() and done.port_policy == "restrict"
    assert done.ports == (PortAttrs(port=8080, pp=False),)


def _forged_app_info_identity(kms: Kms, victim: AppInfo) -> tuple[str, str]:
    """What anyone can make with the temp CA's public key: a quote-less certificate stating
    the victim's AppInfo (the extension is only its signer's word)."""
    temp = x509.load_pem_x509_certificate(kms.temp["temp_ca_cert"].encode())
    temp_key = serialization.load_pem_private_key(kms.temp["temp_ca_key"].encode(), None)
    assert isinstance(temp_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    cert = build_ratls_cert(key, None, subject="dstack-guest-agent", issuer=(temp, temp_key),
                            usage_client_auth=True, app_id=victim.app_id, app_info=victim,
                            special_usage="app:custom", not_before=now - 60,
                            not_after=now + 3600)  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem(key)


@pytest.mark.timeout(90)
async def test_an_app_info_certificate_not_from_the_kms_is_refused(
    store: EventStore, kms: Kms, pki: DevPki
) -> None:
    """A quote-less certificate stating a victim's AppInfo under the temp CA fails TLS (only
    the KMS root is trusted for registration); nothing is appended. (Were TLS misconfigured,
    the handler's chain check refuses a temp-CA chain: test_gateway_admission.py.)"""
    victim = AppInfo(app_id=APP_ID, compose_hash=b"\x01" * 32, instance_id=b"\x43" * 20,
                     device_id=b"", mr_system=b"\x02" * 32, mr_aggregated=b"\x03" * 32,
                     os_image_hash=b"", key_provider_info=b"")  # fmt: skip
    forged = _forged_app_info_identity(kms, victim)
    async with gateway(store, kms, pki) as gw:
        before = await store.last_seq()
        with pytest.raises(aiohttp.ClientError):
            await gw.post("/prpc/RegisterCvm?json", forged, {"client_public_key": wg_key(3)})
        assert await store.last_seq() == before and await gw.registered() == []
