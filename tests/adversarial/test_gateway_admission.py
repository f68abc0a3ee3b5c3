"""Gateway admission through the KMS, as dstack does it (issue 14).

A CVM registers with the client certificate its KMS issued through ``SignCert`` under its
app's own CA: leaf, app CA (app id inside), KMS root. Before, the gateway also trusted the
KMS temp CA, whose private key ``GetTempCaCert`` gives to anyone: any attested TD could mint
a "client certificate" (or a whole "app CA" for a victim's app id) under it. And an app's
``GetTlsKey`` certificates came from that temp CA too. Now the gateway trusts only the KMS
root and admits only the chain shape only the KMS makes, for the app the quote names; the
agent's certificates come from SignCert; and a flood of SignCert by one instance leaves at
most one decision per usage on the log.

Everything is real but the TDX hardware: nats-server, the KMS on TLS with its webhook
backend, the RegisterCvm endpoint on mutual TLS, simulated TDs of the dev PKI."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from dstack_sdk import AsyncDstackClient
from OpenSSL import crypto

from pydstack.actors.gateway import Registrar, RegistrarConfig
from pydstack.actors.gateway.client_chain import AppChainCheck, certs_of
from pydstack.actors.gateway.node_launch import RegistrationLaunch, _client_chain
from pydstack.actors.gateway.registration import (
    PATH,
    RegistrationConfig,
    registration_app,
    serve_registration,
)
from pydstack.actors.kms import KmsCallError, make_recheck
from pydstack.actors.kms.certgrants import boot_time_of
from pydstack.adapters.nats import EventStore
from pydstack.adapters.tdx.attestation import decode_attestation, encode_attestation
from pydstack.adapters.tdx.identity import decode_app_info, measurements_of
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.quote import parse_quote
from pydstack.adapters.tdx.ratls import (
    OID_APP_INFO,
    app_id_of,
    build_ratls_cert,
    check_ratls_cert,
    ratls_report_data,
    special_usage,
)
from pydstack.adapters.tdx.ratls_tls import client_ssl_context, server_ssl_context
from pydstack.core.events import (
    CvmRegistered,
    GatewayNodeJoined,
    KeyDenied,
    KeyIssued,
    KeyRequested,
    decode_body,
    open_envelope,
)
from pydstack.core.kms import CertConfig, audit_kms_log
from pydstack_guest import GuestAgent, GuestConfig, serve_agent
from pydstack_guest.cert_client import signed_csr
from tests.gateway.given import key as wg_key
from tests.gateway.simcvm import DevCa, SimCvm, key_pem, pem
from tests.gateway.test_registration import _dev_verifier
from tests.kms.conftest import (
    APP_ID,
    VM_CONFIG,
    Cvm,
    Kms,
    Webhook,
    client_cert,
    kms,
    make_cvm,
    pki,
    webhook,
)
from tests.kms.test_guest import provider

__all__ = ["kms", "pki", "webhook"]  # fixtures of the KMS rig (real NATS, KMS on TLS, webhook)

ATTACKER_COMPOSE = '{"manifest_version":2,"name":"attacker","runner":"docker-compose"}'
ATTACKER_APP = hashlib.sha256(ATTACKER_COMPOSE.encode()).digest()[:20]
EVIL_COMPOSE = '{"manifest_version":2,"name":"evil","runner":"docker-compose"}'


@dataclass
class Gw:
    url: str
    ca: DevCa  # the gateway's own server CA (what CVMs trust for it)
    store: EventStore

    async def post(self, identity: tuple[str, str], n: int) -> tuple[int, dict[str, Any]]:
        """RegisterCvm over mutual TLS; (0, error) when the TLS handshake is refused."""
        ssl = client_ssl_context(identity[0], identity[1], self.ca.pem)
        body = json.dumps({"client_public_key": wg_key(n)})
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl)) as s:
                async with s.post(self.url + PATH, data=body) as resp:
                    return resp.status, await resp.json()
        except aiohttp.ClientError as e:
            return 0, {"error": f"{type(e).__name__}: {e}"}

    async def registered(self) -> list[CvmRegistered]:
        out = [decode_body(open_envelope(r.data)) async for r in self.store.read()]
        return [e for e in out if isinstance(e, CvmRegistered)]


@contextlib.asynccontextmanager
async def running_gateway(
    store: EventStore, kms: Kms, pki: DevPki, *, tls_trusts_temp_ca: bool = False
) -> AsyncIterator[Gw]:
    """A RegisterCvm endpoint as a node builds it (`node_launch._client_chain`), given the
    client CA the old `up` gave: the KMS root and its temp CA. `tls_trusts_temp_ca`: TLS is
    (mis)configured to trust the temp CA too, so the request reaches the handler's check."""
    registrar = Registrar(store, RegistrarConfig(node_id="gw1"))
    await registrar.join(GatewayNodeJoined(
        node_id="gw1", wg_public_key=wg_key(500), tunnel_ip="10.0.0.129",
        endpoint="192.0.2.1:51820", base_domain="gw.example.com", url="https://gw1:8011",
    ))  # fmt: skip
    created = kms.svc.created
    launch = RegistrationLaunch("", "", created.ca_cert_pem + created.temp_ca_cert_pem)
    check = await _client_chain(store, "gw1", launch)
    app = registration_app(registrar, _dev_verifier(pki), RegistrationConfig(node_id="gw1"),
                           client_chain=check)  # fmt: skip
    ca = DevCa.create()
    chain, key = await SimCvm(pki, bytes(20), b"\xee" * 20, b"gateway").identity(ca)
    trusted = check.roots_pem + (created.temp_ca_cert_pem if tls_trusts_temp_ca else "")
    runner = await serve_registration(app, "127.0.0.1", 0, server_ssl_context(chain, key, trusted))
    port = runner.addresses[0][1]
    try:
        yield Gw(f"https://127.0.0.1:{port}", ca, store)
    finally:
        await runner.cleanup()
        await registrar.aclose()


async def sign_cert(
    kms: Kms, cvm: Cvm, key: ec.EllipticCurvePrivateKey, *, server: bool = False,
    vm_config: str = VM_CONFIG,
) -> list[str]:  # fmt: skip
    """The KMS's SignCert chain for `key`, the CSR attested by `cvm` (dstack-util's gateway
    certificate: client auth, quote and app info embedded)."""
    att = encode_attestation(await cvm.attest(ratls_report_data(key.public_key())))
    config = CertConfig(subject="dstack-guest-agent", usage_client_auth=not server,
                        usage_server_auth=server, ext_quote=True, ext_app_info=True)  # fmt: skip
    raw, sig = signed_csr(key, config, att)
    body = {"api_version": 2, "csr": raw.hex(), "signature": sig.hex(), "vm_config": vm_config}
    async with kms.client() as c:
        out = await c.call("SignCert", body)
    chain = out["certificate_chain"]
    assert isinstance(chain, list)
    return chain


async def kms_identity(kms: Kms, cvm: Cvm) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    return "".join(await sign_cert(kms, cvm, key)), key_pem(key)


def _temp(kms: Kms) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(kms.temp["temp_ca_cert"].encode())
    key = serialization.load_pem_private_key(kms.temp["temp_ca_key"].encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


async def forged_app_ca_identity(kms: Kms, cvm: Cvm, app_id: bytes) -> tuple[str, str]:
    """What anyone can make with the temp CA's public key: an "app CA" for `app_id` under
    the temp CA, and under it a leaf with `cvm`'s genuine evidence."""
    temp, temp_key = _temp(kms)
    now = int(time.time())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    fake_ca = build_ratls_cert(ca_key, None, subject="Dstack App CA", ca_path_len=0,
                               issuer=(temp, temp_key), app_id=app_id, special_usage="app:ca",
                               not_before=now - 60, not_after=now + 3600)  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    att = await cvm.attest(ratls_report_data(key.public_key()))
    leaf = build_ratls_cert(key, att, subject="dstack-guest-agent", issuer=(fake_ca, ca_key),
                            usage_client_auth=True, app_id=app_id, special_usage="app:custom",
                            not_before=now - 60, not_after=now + 3600)  # fmt: skip
    return pem(leaf) + pem(fake_ca) + pem(temp), key_pem(key)


async def temp_ca_identity(kms: Kms, cvm: Cvm) -> tuple[str, str]:
    """An RA-TLS client certificate straight under the temp CA (what CVMs used to present)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return client_cert(kms.temp, await cvm.attest(ratls_report_data(key.public_key())), key)


@pytest.mark.timeout(90)
async def test_a_temp_ca_certificate_is_refused_for_registration(
    store: EventStore, kms: Kms, pki: DevPki
) -> None:
    """An attested, authorized TD presents a certificate under the KMS temp CA (directly, or
    under an "app CA" for the victim's app id minted with the temp CA's public key): the
    node's TLS trusts only the KMS root, so the handshake fails; with TLS misconfigured to
    trust the temp CA as well, the handler refuses it, 403 ``not_app_certificate``; nothing
    is appended either way. The same TD's SignCert chain is admitted (control)."""
    cvm = make_cvm(pki, instance_id=b"\x21" * 20)
    async with running_gateway(store, kms, pki) as gw:
        for identity in (await temp_ca_identity(kms, cvm),
                         await forged_app_ca_identity(kms, cvm, APP_ID)):  # fmt: skip
            before = await store.last_seq()
            status, out = await gw.post(identity, 1)
            assert status == 0, out  # the TLS handshake: unknown CA
            assert await store.last_seq() == before
        assert await gw.registered() == []
        status, out = await gw.post(await kms_identity(kms, cvm), 2)
        assert status == 200, out
    async with running_gateway(store, kms, pki, tls_trusts_temp_ca=True) as gw:
        before = await store.last_seq()
        status, out = await gw.post(await temp_ca_identity(kms, cvm), 3)
        assert (status, out.get("code")) == (403, "not_app_certificate"), out
        assert "chains to the KMS temp CA" in out["error"], out
        # (the forged "app CA" fails TLS even here: the temp CA's path length is 0)
        status, out = await gw.post(await forged_app_ca_identity(kms, cvm, APP_ID), 4)
        assert status in (0, 403), out
        assert await store.last_seq() == before
    # The handler's check alone refuses the forged chain too, whatever TLS let through.
    forged, _ = await forged_app_ca_identity(kms, cvm, APP_ID)
    created = kms.svc.created
    check = AppChainCheck.from_pem(created.ca_cert_pem + created.temp_ca_cert_pem,
                                   never_pem=created.temp_ca_cert_pem)  # fmt: skip
    ders = [c.public_bytes(serialization.Encoding.DER) for c in certs_of(forged)]
    assert "temp CA" in (check.reason(ders, APP_ID) or "")
    assert [e.wg_public_key for e in await gw.registered()] == [wg_key(2)]


@pytest.mark.timeout(90)
async def test_another_apps_signcert_chain_is_refused_under_the_victims_app_id(
    store: EventStore, kms: Kms, pki: DevPki, webhook: Webhook
) -> None:
    """The attacker runs its own authorized app and gets genuine SignCert chains for it. Its
    TD claiming the victim's app id (with its own compose) gets no SignCert from the KMS; a
    chain through the attacker app's CA carrying that TD's evidence (victim's app id) is
    refused, 403 ``not_app_certificate``, nothing appended. The victim's and the attacker's
    own chains register as their own apps (controls)."""
    webhook.config["apps"][ATTACKER_APP.hex()] = {  # the attacker's own app, allowed
        "composeHashes": [hashlib.sha256(ATTACKER_COMPOSE.encode()).hexdigest()]
    }
    victim = make_cvm(pki, instance_id=b"\x31" * 20)
    attacker = make_cvm(pki, compose=ATTACKER_COMPOSE, instance_id=b"\x32" * 20)
    impostor = make_cvm(pki, compose=EVIL_COMPOSE, app_id=APP_ID, instance_id=b"\x33" * 20)
    async with running_gateway(store, kms, pki) as gw:
        assert (await gw.post(await kms_identity(kms, victim), 1))[0] == 200
        assert (await gw.post(await kms_identity(kms, attacker), 2))[0] == 200
        with pytest.raises(KmsCallError) as denied:  # the KMS signs nothing for the impostor
            await kms_identity(kms, impostor)
        assert denied.value.status == 403 and "compose hash not allowed" in denied.value.error
        # A chain the attacker app's CA signed, carrying the impostor's evidence.
        app_ca, app_ca_key = kms.svc.app_ca(ATTACKER_APP)
        key = ec.generate_private_key(ec.SECP256R1())
        att = await impostor.attest(ratls_report_data(key.public_key()))
        now = int(time.time())
        leaf = build_ratls_cert(key, att, subject="dstack-guest-agent",
                                issuer=(app_ca, app_ca_key), usage_client_auth=True,
                                app_id=ATTACKER_APP, special_usage="app:custom",
                                not_before=now - 60, not_after=now + 3600)  # fmt: skip
        chain = pem(leaf) + pem(app_ca) + kms.svc.created.ca_cert_pem
        before = await store.last_seq()
        status, out = await gw.post((chain, key_pem(key)), 3)
        assert (status, out.get("code")) == (403, "not_app_certificate"), out
        assert f"app CA is app {ATTACKER_APP.hex()}'s" in out["error"]
        assert await store.last_seq() == before
        apps = {e.app_id: e.wg_public_key for e in await gw.registered()}
    assert apps == {APP_ID.hex(): wg_key(1), ATTACKER_APP.hex(): wg_key(2)}


@pytest.mark.timeout(90)
async def test_get_tls_key_chain_verifies_to_the_kms_root_through_the_app_ca(
    kms: Kms, pki: DevPki
) -> None:
    """An app asks its agent (dstack-sdk on the agent's socket) for a TLS key: the chain is
    leaf, app CA, KMS root; OpenSSL verifies it to the root of KmsRootCreated and not to the
    temp CA; the leaf names app:custom and the app id, embeds the quote (RA-TLS, bound to
    the leaf key) and the app info when asked."""
    cvm = make_cvm(pki, instance_id=b"\x41" * 20)
    agent = await GuestAgent.create(cvm.backend, provider(kms, pki, cvm),
                                    GuestConfig(vm_config=VM_CONFIG))  # fmt: skip
    d = Path(tempfile.mkdtemp(prefix="pyds-", dir="/tmp"))
    try:
        async with serve_agent(agent, dstack_sock=str(d / "d.sock")):
            async with AsyncDstackClient(str(d / "d.sock")) as c:
                r = await c.get_tls_key(subject="app.example", alt_names=["app.example"],
                                        usage_ra_tls=True, with_app_info=True)  # fmt: skip
    finally:
        shutil.rmtree(d, ignore_errors=True)
    leaf, app_ca, root = (x509.load_pem_x509_certificate(p.encode()) for p in r.certificate_chain)
    created = kms.svc.created
    assert root == x509.load_pem_x509_certificate(created.ca_cert_pem.encode())
    temp = x509.load_pem_x509_certificate(created.temp_ca_cert_pem.encode())

    def openssl_verifies(anchor: x509.Certificate) -> bool:
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(anchor))
        ctx = crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf),
                                      [crypto.X509.from_cryptography(app_ca)])  # fmt: skip
        try:
            ctx.verify_certificate()
        except crypto.X509StoreContextError:
            return False
        return True

    assert openssl_verifies(root) and not openssl_verifies(temp)
    for cert in (leaf, app_ca):
        with pytest.raises((InvalidSignature, ValueError)):
            cert.verify_directly_issued_by(temp)
    assert (special_usage(app_ca), special_usage(leaf)) == ("app:ca", "app:custom")
    assert app_id_of(app_ca) == app_id_of(leaf) == APP_ID
    key = serialization.load_pem_private_key(r.key.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert leaf.public_key() == key.public_key()
    der = leaf.public_bytes(serialization.Encoding.DER)
    checked = check_ratls_cert(der, kms.collateral.get(), now=int(time.time()),
                               root_ca_der=pki.root_der)  # fmt: skip
    assert checked.ok, checked.reasons
    assert checked.app_info is not None and checked.app_info.app_id == APP_ID
    leaf.extensions.get_extension_for_oid(OID_APP_INFO)  # ext_app_info embedded


@pytest.mark.timeout(180)
async def test_a_signcert_flood_by_one_instance_adds_one_decision_per_usage(
    kms: Kms, pki: DevPki
) -> None:
    """One instance sends 120 SignCert requests for client certificates and 120 for server
    certificates: every certificate is issued for its own key, the log grows by one
    KeyRequested + KeyIssued per usage. 40 more claim four other images: two get their own
    (refused) decision, the rest 429 and nothing (three decisions per window). An instance
    whose compose is not allowed floods 60: each gets the same 403 and its one KeyDenied.
    Decisions use the boot-time measurements (an event emitted after boot changes nothing),
    and the log audits clean."""
    cvm = make_cvm(pki, instance_id=b"\x51" * 20)
    before = len(await kms.events())

    async def issue(server: bool) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        chain = await sign_cert(kms, cvm, key, server=server)
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        assert leaf.public_key() == key.public_key()

    for server in (False, True):
        for _ in range(3):  # 40 at once, three times
            await asyncio.gather(*(issue(server) for _ in range(40)))
    new = (await kms.events())[before:]
    assert [type(e) for e in new] == [KeyRequested, KeyIssued] * 2, new
    assert [e.usage for e in new if isinstance(e, KeyRequested)] == ["client", "server"]
    # An event the app emits after boot changes RTMR3, not the boot-time measurements that
    # SignCert decides on: still answered under the same decision.
    cvm.backend.emit_event("app-event", b"after boot")
    await issue(False)
    assert len(await kms.events()) == before + 4

    async def other_measurements(vm_config: str) -> int:
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            await sign_cert(kms, cvm, key, vm_config=vm_config)
        except KmsCallError as e:
            return e.status
        return 200

    # Other claimed images: each is decided once (refused: no such image), up to three
    # decisions per instance, compose hash and usage in a window; beyond, 429 and nothing.
    for n, want in enumerate((403, 403, 429, 429)):
        other = json.dumps({**json.loads(VM_CONFIG), "os_image_hash": f"{n + 1:02x}" * 32})
        statuses = await asyncio.gather(*(other_measurements(other) for _ in range(10)))
        assert set(statuses) == {want}, (n, statuses)
    new = (await kms.events())[before + 4 :]
    assert [type(e) for e in new] == [KeyRequested, KeyDenied] * 2, new
    before += 8

    refused = make_cvm(pki, compose=EVIL_COMPOSE, instance_id=b"\x52" * 20)

    async def denied() -> str:
        with pytest.raises(KmsCallError) as e:
            await sign_cert(kms, refused, ec.generate_private_key(ec.SECP256R1()))
        assert e.value.status == 403
        return e.value.error

    reasons = await asyncio.gather(*(denied() for _ in range(60)))
    new = (await kms.events())[before:]
    assert [type(e) for e in new] == [KeyRequested, KeyDenied], new
    assert set(reasons) == {new[1].reason}
    # A TD that emitted an event after boot before its first SignCert: decided on the
    # boot-time view (dstack's), which the auditor accepts.
    late = make_cvm(pki, instance_id=b"\x53" * 20)
    late.backend.emit_event("app-event", b"before asking")
    await sign_cert(kms, late, ec.generate_private_key(ec.SECP256R1()))
    requested, decided = (await kms.events())[-2:]
    assert isinstance(requested, KeyRequested) and isinstance(decided, KeyIssued)
    att = decode_attestation(requested.attestation)
    td = measurements_of(parse_quote(att.quote).report)
    at_boot = decode_app_info(td, att.runtime_events, boottime_mr=True)
    now_view = decode_app_info(td, att.runtime_events)
    assert decided.boot_info.mr_aggregated == at_boot.mr_aggregated.hex()
    assert at_boot.mr_aggregated != now_view.mr_aggregated
    recheck = make_recheck(kms.collateral.get, pki.root_der)
    assert audit_kms_log(await kms.events(), recheck, boot_time_of) == []
    # A SignCert decision recorded with the current view instead fails the audit.
    current = msgspec.structs.replace(decided.boot_info, mr_aggregated=now_view.mr_aggregated.hex())
    forged = msgspec.structs.replace(decided, boot_info=current)
    problems = audit_kms_log([requested, forged], recheck, boot_time_of)
    assert any("BootInfo differs" in p for p in problems), problems
