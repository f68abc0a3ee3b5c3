"""A dstack v0.5.11 guest's check of the gateway's RegisterCvm certificate, against a
pydstack gateway node whose certificate comes from the KMS as the gateway app
(`actors/gateway/app_cert.py`), and what an attacker's gateway certificate gets.

v0.5.11's guest (`dstack-util` `GatewayContext::create_gateway_client`, `ra-rpc`
`RaClient`): TLS trusts only GetTempCaCert's `ca_cert` (the KMS root; no system roots,
hostname checked), then `AppIdValidator`: the leaf's app id extension (OID 1.3), hex,
must be within GetAppKey's `gateway_app_id` (case-insensitive `contains`), unless that is
"any". `dstack_checks_gateway` below does exactly that.

Everything is real but the TDX hardware: nats-server, the KMS on TLS with its webhook
backend (the gateway app registered and named as `gatewayAppId`), RegisterCvm on mutual
TLS, simulated TDs of the dev PKI."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from pydstack.actors.gateway import Registrar, RegistrarConfig
from pydstack.actors.gateway.app_cert import KmsAppCert
from pydstack.actors.gateway.node_launch import (
    RegistrationLaunch,
    _client_chain,
    registration_identity,
)
from pydstack.actors.gateway.registration import (
    RegistrationConfig,
    registration_app,
    serve_registration,
)
from pydstack.adapters.nats import EventStore
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import (
    app_id_of,
    app_info_of,
    build_ratls_cert,
    ratls_report_data,
)
from pydstack.adapters.tdx.ratls_tls import server_ssl_context
from pydstack.adapters.wireguard import DeviceError
from pydstack.core.events import CvmRegistered, GatewayNodeJoined, decode_body, open_envelope
from pydstack_guest import GuestAgent, GuestConfig, create_dev_app_keys
from pydstack_guest.app import serve_agent
from pydstack_guest.gateway_client import (
    GatewayAppCheck,
    GatewayRegistrationError,
    register_cvm,
)
from tests.adversarial.test_dstack_guest_admission import dstack_gateway_certs, get_app_key
from tests.gateway.given import key as wg_key
from tests.gateway.simcvm import DevCa
from tests.gateway.test_registration import _dev_verifier
from tests.kms.conftest import APP_ID, VM_CONFIG, Kms, Webhook, kms, make_cvm, pki, webhook
from tests.kms.dstack_guest import generate_ra_cert, key_pem

__all__ = ["kms", "pki", "webhook"]  # fixtures of the KMS rig

GW_COMPOSE = '{"manifest_version":2,"name":"dstack-gateway","runner":"docker-compose"}'
GW_HASH = hashlib.sha256(GW_COMPOSE.encode()).digest()
GW_APP = GW_HASH[:20]  # the gateway app's id, as its TD measures it
HOST = "127.0.0.1"


class DstackRefused(Exception):
    """What v0.5.11's guest would bail with before trusting the gateway's answer."""


def admit_gateway_app(webhook: Webhook) -> None:
    """The KMS's authorization knows the gateway app and names it (auth-simple's
    `gatewayAppId`), as a dstack deployment registers its gateway CVM's app."""
    webhook.config["apps"][GW_APP.hex()] = {"composeHashes": [GW_HASH.hex()]}
    webhook.config["gatewayAppId"] = GW_APP.hex()


def app_id_validator(allowed_app_id: str, leaf_der: bytes) -> None:
    """dstack-util's `AppIdValidator::validate`."""
    if allowed_app_id == "any":
        return
    app_id = app_id_of(x509.load_der_x509_certificate(leaf_der))
    if app_id is None:
        raise DstackRefused("Missing app id")
    if app_id.hex().lower() not in allowed_app_id.lower():
        raise DstackRefused(f"Invalid dstack-gateway app id: {app_id.hex()}")


async def dstack_checks_gateway(
    url: str, identity: tuple[str, str], ca_cert: str, gateway_app_id: str, body: Any
) -> dict[str, Any]:
    """RegisterCvm as v0.5.11's guest posts it, with its server checks (see module doc)."""
    ctx = ssl.create_default_context(cadata=ca_cert)  # tls_built_in_root_certs(false)
    if gateway_app_id == "any":  # tls_no_check
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with tempfile.TemporaryDirectory() as d:
        Path(d, "id.pem").write_text(identity[0] + "\n" + identity[1])  # noqa: ASYNC240 - tiny
        ctx.load_cert_chain(f"{d}/id.pem")
    host, port = url.removeprefix("https://").rsplit(":", 1)
    try:
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
    except ssl.SSLCertVerificationError as e:
        raise DstackRefused(f"TLS: {e.verify_message}") from None
    try:
        # RaClient validates the certificate of the connection the request went over
        app_id_validator(gateway_app_id, writer.get_extra_info("ssl_object").getpeercert(True))
        data = json.dumps(body).encode()
        writer.write(f"POST /prpc/RegisterCvm?json HTTP/1.1\r\nHost: {host}\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                     + data)  # fmt: skip
        head, _, payload = (await reader.read(-1)).partition(b"\r\n\r\n")
    finally:
        writer.close()
    assert head.split(b" ")[1] == b"200", head + payload
    out: dict[str, Any] = json.loads(payload)
    return out


@contextlib.asynccontextmanager
async def serving(
    store: EventStore, kms: Kms, pki: DevPki, identity: tuple[str, str]
) -> AsyncIterator[str]:
    """RegisterCvm as a node serves it (`node_launch`), with the given server identity."""
    registrar = Registrar(store, RegistrarConfig(node_id="gw1"))
    await registrar.join(GatewayNodeJoined(
        node_id="gw1", wg_public_key=wg_key(500), tunnel_ip="10.0.0.129",
        endpoint="192.0.2.1:51820", base_domain="gw.example.com", url="https://gw1:8011",
    ))  # fmt: skip
    check = await _client_chain(
        store, "gw1", RegistrationLaunch("", "", kms.svc.created.ca_cert_pem)
    )
    app = registration_app(registrar, _dev_verifier(pki), RegistrationConfig(node_id="gw1"),
                           client_chain=check)  # fmt: skip
    ctx = server_ssl_context(identity[0], identity[1], check.roots_pem)
    runner = await serve_registration(app, HOST, 0, ctx)
    try:
        yield f"https://{HOST}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
        await registrar.aclose()


def node_reg(kms: Kms, attester: Any, app_id: bytes = GW_APP, **kw: Any) -> RegistrationLaunch:
    root, vm_config = kw.pop("root", kms.temp["ca_cert"]), kw.pop("vm_config", VM_CONFIG)
    spec = KmsAppCert(kms_url=kms.url, kms_root_pem=root, app_id=app_id,
                      alt_names=("localhost", HOST), vm_config=vm_config,
                      guest_agent=kw.pop("guest_agent", None))  # fmt: skip
    return RegistrationLaunch("", "", kms.svc.created.ca_cert_pem, kms_cert=spec,
                              attester=attester)  # fmt: skip


async def dstack_guest(kms: Kms, pki: DevPki, instance: bytes) -> tuple[str, tuple[str, str]]:
    """A v0.5.11 guest's GetAppKey answer's `gateway_app_id` and its RegisterCvm identity."""
    cvm = make_cvm(pki, instance_id=instance)
    key = ec.generate_private_key(ec.SECP256R1())
    kms_identity = generate_ra_cert(kms.temp, await cvm.attest(ratls_report_data(key.public_key())),
                                    key)  # fmt: skip
    keys = await get_app_key(kms, kms_identity)
    app_info_cert, _ = await dstack_gateway_certs(kms, cvm)
    return str(keys["gateway_app_id"]), app_info_cert


async def registered(store: EventStore) -> list[CvmRegistered]:
    out = [decode_body(open_envelope(r.data)) async for r in store.read()]
    return [e for e in out if isinstance(e, CvmRegistered)]


@pytest.mark.timeout(120)
async def test_a_dstack_guest_accepts_the_nodes_kms_certificate_for_the_gateway_app(
    store: EventStore, kms: Kms, pki: DevPki, webhook: Webhook
) -> None:
    """The node's certificate is leaf (app id GW_APP, AppInfo) <- gateway app CA <- KMS
    root; v0.5.11's checks pass with GetAppKey's gateway_app_id, and our own guest, pinning
    the KMS root, registers too."""
    admit_gateway_app(webhook)
    gw_td = make_cvm(pki, compose=GW_COMPOSE, instance_id=b"\x61" * 20)
    # vm_config "": the one the TD's evidence carries (a guest agent's sys-config)
    with capture_logs() as logs:
        chain, key = await registration_identity("gw1", node_reg(kms, gw_td, vm_config=""))
    assert any("SIMULATED" in e["event"] and e["log_level"] == "warning" for e in logs)
    certs = x509.load_pem_x509_certificates(chain.encode())
    assert [app_id_of(c) for c in certs[:2]] == [GW_APP, GW_APP] and len(certs) == 3
    assert certs[2] == x509.load_pem_x509_certificate(kms.temp["ca_cert"].encode())
    gateway_app_id, identity = await dstack_guest(kms, pki, b"\x62" * 20)
    assert gateway_app_id == GW_APP.hex()
    async with serving(store, kms, pki, (chain, key)) as url:
        out = await dstack_checks_gateway(url, identity, kms.temp["ca_cert"], gateway_app_id,
                                          {"client_public_key": wg_key(11)})  # fmt: skip
        assert out["wg"]["client_ip"]
        ours = await register_cvm(url, identity=identity, ca_pem=kms.temp["ca_cert"],
                                  wg_public_key=wg_key(12))  # fmt: skip
        assert ours.client_ip
    assert {r.instance_id for r in await registered(store)} == {(b"\x62" * 20).hex()}


@pytest.mark.timeout(120)
async def test_a_node_in_a_cvm_gets_its_evidence_from_the_guest_agent(
    kms: Kms, pki: DevPki, webhook: Webhook, tmp_path: Path
) -> None:
    """`--guest-agent SOCKET`: the node quotes through the agent's `Attest` (here our agent
    on a real socket over the gateway app's simulated TD), vm_config from its sys-config."""
    admit_gateway_app(webhook)
    gw_td = make_cvm(pki, compose=GW_COMPOSE, instance_id=b"\x69" * 20)
    keys, _ = create_dev_app_keys(GW_APP, now=0)
    agent = GuestAgent(gw_td.backend, keys, GuestConfig(vm_config=VM_CONFIG))
    sock = str(tmp_path / "dstack.sock")
    async with serve_agent(agent, dstack_sock=sock):
        reg = node_reg(kms, None, vm_config="", guest_agent=sock)
        chain, _ = await registration_identity("gw1", reg)
    leaf = x509.load_pem_x509_certificates(chain.encode())[0]
    assert app_id_of(leaf) == GW_APP
    stated = app_info_of(leaf)
    assert stated is not None and stated.instance_id == b"\x69" * 20


@pytest.mark.timeout(120)
async def test_a_kms_certificate_of_another_app_fails_the_dstack_guests_check(
    store: EventStore, kms: Kms, pki: DevPki, webhook: Webhook
) -> None:
    """Any admitted app can get a server certificate from the KMS: served as a gateway, the
    chain verifies but `AppIdValidator` refuses its app id (only "any" lets it through)."""
    admit_gateway_app(webhook)
    app_td = make_cvm(pki, instance_id=b"\x63" * 20)  # the ordinary test app APP_ID
    chain, key = await registration_identity("gw1", node_reg(kms, app_td, app_id=APP_ID))
    gateway_app_id, identity = await dstack_guest(kms, pki, b"\x64" * 20)
    async with serving(store, kms, pki, (chain, key)) as url:
        with pytest.raises(DstackRefused, match=f"Invalid dstack-gateway app id: {APP_ID.hex()}"):
            await dstack_checks_gateway(url, identity, kms.temp["ca_cert"], gateway_app_id,
                                        {"client_public_key": wg_key(13)})  # fmt: skip
        # dstack's documented escape hatch, never what our KMS answers
        await dstack_checks_gateway(url, identity, kms.temp["ca_cert"], "any",
                                    {"client_public_key": wg_key(14)})  # fmt: skip
        # our own guest, pinning the KMS root, checks the app id the same way
        with pytest.raises(GatewayRegistrationError, match=f"names app {APP_ID.hex()}, not "
                           f"the KMS's gateway app {GW_APP.hex()}"):  # fmt: skip
            await register_cvm(
                url,
                identity=identity,
                ca_pem=kms.temp["ca_cert"],
                wg_public_key=wg_key(15),
                app_check=GatewayAppCheck(GW_APP.hex()),
            )
    assert {r.instance_id for r in await registered(store)} == {(b"\x64" * 20).hex()}


@pytest.mark.timeout(120)
async def test_a_gateway_chain_not_from_this_kms_fails_tls(
    store: EventStore, kms: Kms, pki: DevPki, webhook: Webhook
) -> None:
    """A chain shaped exactly as the KMS's (app CA `app:ca` with the gateway app id, leaf
    with it) under another root fails the guest's TLS check before any app id is read."""
    admit_gateway_app(webhook)
    ca = DevCa.create()
    app_ca, app_key = ca.app_ca(GW_APP)
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    leaf = build_ratls_cert(key, None, subject="dstack-gateway", alt_names=("localhost", HOST),
                            issuer=(app_ca, app_key), usage_server_auth=True,
                            usage_client_auth=True, app_id=GW_APP, not_before=now - 60,
                            not_after=now + 3600)  # fmt: skip
    pem = serialization.Encoding.PEM
    chain = "".join(c.public_bytes(pem).decode() for c in (leaf, app_ca, ca.cert))
    gateway_app_id, identity = await dstack_guest(kms, pki, b"\x65" * 20)
    async with serving(store, kms, pki, (chain, key_pem(key))) as url:
        with pytest.raises(DstackRefused, match="TLS"):
            await dstack_checks_gateway(url, identity, kms.temp["ca_cert"], gateway_app_id,
                                        {"client_public_key": wg_key(15)})  # fmt: skip
    assert await registered(store) == []


@pytest.mark.timeout(120)
async def test_a_node_gets_no_certificate_for_an_app_it_is_not(
    kms: Kms, pki: DevPki, webhook: Webhook
) -> None:
    """The KMS signs for the app the node's TD measures: a node of another app asking for
    the gateway app id gets a chain of its own app, which the node refuses in one line."""
    admit_gateway_app(webhook)
    app_td = make_cvm(pki, instance_id=b"\x66" * 20)
    with pytest.raises(DeviceError, match=f"no chain through app {GW_APP.hex()}'s CA"):
        await registration_identity("gw1", node_reg(kms, app_td))


@pytest.mark.timeout(120)
async def test_a_node_refuses_a_kms_that_is_not_the_one_it_was_told(
    kms: Kms, pki: DevPki, webhook: Webhook
) -> None:
    """Pointed at a server whose root is not the expected KMS root, the node's TLS to it
    fails: no certificate, one line."""
    admit_gateway_app(webhook)
    gw_td = make_cvm(pki, compose=GW_COMPOSE, instance_id=b"\x67" * 20)
    reg = node_reg(kms, gw_td, root=DevCa.create().pem)
    with pytest.raises(DeviceError, match="SignCert: ClientConnectorCertificateError"):
        await registration_identity("gw1", reg)


@pytest.mark.timeout(120)
async def test_an_unadmitted_gateway_app_gets_no_certificate(
    kms: Kms, pki: DevPki, webhook: Webhook
) -> None:
    """Without the gateway app in the KMS's authorization, SignCert is refused."""
    gw_td = make_cvm(pki, compose=GW_COMPOSE, instance_id=b"\x68" * 20)
    with pytest.raises(DeviceError, match="refused SignCert"):
        await registration_identity("gw1", node_reg(kms, gw_td))


async def test_a_kms_certificate_needs_one_source_of_evidence(pki: DevPki) -> None:
    """Neither a guest agent nor an attester, or both: refused before anything is asked."""
    spec = KmsAppCert(kms_url="https://127.0.0.1:1", kms_root_pem="", app_id=GW_APP)
    with pytest.raises(DeviceError, match="needs evidence"):
        await registration_identity("gw1", RegistrationLaunch("", "", "", kms_cert=spec))
    both = KmsAppCert(kms_url="https://127.0.0.1:1", kms_root_pem="", app_id=GW_APP,
                      guest_agent="/nonexistent.sock")  # fmt: skip
    reg = RegistrationLaunch("", "", "", kms_cert=both, attester=make_cvm(pki))
    with pytest.raises(DeviceError, match="not both"):
        await registration_identity("gw1", reg)


def test_our_guest_checks_the_gateway_app_only_under_the_kms_root() -> None:
    """gateway_app_check: a gateway CA that includes the KMS root demands the KMS's single
    gateway app id (none, "any" or two ids stop the boot); another CA (`up`'s own) needs none."""
    from pydstack_guest.boot import BootFailed
    from pydstack_guest.gateway_setup import gateway_app_check

    keys, _ = create_dev_app_keys(APP_ID, now=0)
    root = create_dev_app_keys(b"\x01" * 20, now=0)[0].ca_cert_pem  # stands for the KMS root
    under_kms = msgspec.structs.replace(keys, kms_ca_cert_pem=root, gateway_app_id=GW_APP.hex())
    check = gateway_app_check(root, under_kms)
    assert check is not None and check.want == GW_APP.hex()
    other_ca = create_dev_app_keys(GW_APP, now=0)[0].ca_cert_pem
    assert gateway_app_check(other_ca, under_kms) is None
    assert gateway_app_check(root, keys) is None  # local keys: no KMS root to confuse
    for bad in ("", "any", GW_APP.hex() + APP_ID.hex(), "zz" * 20):
        with pytest.raises(BootFailed, match="no single gateway app id"):
            gateway_app_check(root, msgspec.structs.replace(under_kms, gateway_app_id=bad))
