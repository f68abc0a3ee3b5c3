"""The host writes the KMS URL a CVM asks for its keys (sys-config), so it can point a CVM at a
server of its own and hand it keys it knows. A CVM boots (`run_boot`, simulated TD) against:
a server whose certificate, under the real KMS root, lacks ``kms:rpc``; a server presenting
another app's `SignCert` certificate; a server with the real KMS's own certificate whose
``k256_signature`` (or claimed root) is another root's; another complete KMS while the
app-compose pins this one. Each is a boot error at ``keys`` naming the check, and no key of
it is used (for the certificate checks: no request was even sent). The real KMS works."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.actors.kms import KmsClient, KmsService, KmsSettings, WebhookBackend, serve_kms
from pydstack.adapters.nats import EventStore
from pydstack.adapters.tdx.attestation import encode_attestation
from pydstack.adapters.tdx.collateral import Collateral
from pydstack.adapters.tdx.identity import kms_bootstrap_report_data
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import build_ratls_cert, ratls_report_data
from pydstack.core.kms import CertConfig, Csr, encode_csr
from pydstack_guest import LocalKeyProvider
from pydstack_guest.boot import BootFailed, BootResult, HostShared, plan_boot, run_boot
from pydstack_guest.keys import k256_public, kms_issue_app_key
from pydstack_guest.kms_trust import KmsTrust, spki_of
from tests import images
from tests.gateway import simcvm
from tests.kms.conftest import (
    OS_IMAGE,
    VM_CONFIG,
    CollateralBox,
    Kms,
    Webhook,
    kms,
    kms_guest,
    make_cvm,
    pki,
    webhook,
)

__all__ = ["kms", "pki", "webhook"]  # the KMS suite's fixtures


@dataclass
class FakeKms:
    """A TLS server answering the KMS RPC: GetTempCaCert and GetMeta as given, GetAppKey as
    `app_key` says; it counts what it was asked."""

    temp: dict[str, Any]
    meta: dict[str, Any]
    app_key: Callable[[], dict[str, Any]]
    calls: list[str] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            method = request.match_info["method"]
            self.calls.append(method)
            answers: dict[str, Callable[[], dict[str, Any]]] = {
                "GetTempCaCert": lambda: self.temp, "GetMeta": lambda: self.meta,
                "GetAppKey": self.app_key,
            }  # fmt: skip
            return web.json_response(answers[method]())

        app = web.Application()
        app.router.add_post("/prpc/KMS.{method}", handle)
        return app


async def _serve(fake: FakeKms, chain_pem: str, key_pem: str, tmp: Path) -> web.AppRunner:
    (tmp / "chain.pem").write_text(chain_pem)
    (tmp / "key.pem").write_text(key_pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / "chain.pem", tmp / "key.pem")
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    fake.url = f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    return runner


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[FakeKms]]]:
    runners: list[web.AppRunner] = []

    async def start(fake: FakeKms, chain_pem: str, key_pem: str) -> FakeKms:
        runners.append(await _serve(fake, chain_pem, key_pem, tmp_path))
        return fake

    yield start
    for r in runners:
        await r.cleanup()


def trust_of(kms: Kms, pki: DevPki) -> KmsTrust:
    """The CVM's trust under the simulator: quotes of the dev PKI, with its collateral."""

    async def source(quote: bytes) -> Collateral:
        return kms.collateral.get(quote)

    return KmsTrust(source, root_ca_der=pki.root_der)


@dataclass
class Boot:
    result: BootResult | None
    error: BootFailed | None
    stages: list[tuple[str, str]]


def victim_compose(pin: bytes = b"") -> bytes:
    """The victim's app-compose, pinning `pin` (the KMS root CA's SPKI) or nothing."""
    doc = {"manifest_version": 2, "name": "victim", "runner": "docker-compose",
           "kms_enabled": True, "key_provider_id": pin.hex()}  # fmt: skip
    return json.dumps(doc).encode()


VICTIM_APP = hashlib.sha256(victim_compose()).digest()[:20]  # its measured app id, unpinned


async def boot_victim(
    kms_url: str, pki: DevPki, trust: KmsTrust, webhook: Webhook, tmp: Path, pin: bytes = b""
) -> Boot:
    """Boot the victim app's CVM against `kms_url`; the KMS's webhook allows this app."""
    compose = victim_compose(pin)
    compose_hash = hashlib.sha256(compose).digest()
    webhook.config["apps"][compose_hash[:20].hex()] = {"composeHashes": [compose_hash.hex()]}
    backend = images.measured_backend(pki)  # the test image the KMS fixture registered
    sysc = {"kms_urls": [kms_url], "vm_config": VM_CONFIG}
    info = {"instance_id": os.urandom(20).hex()}
    shared = HostShared(app_compose=compose, sys_config=json.dumps(sysc).encode(),
                        instance_info=json.dumps(info).encode())  # fmt: skip
    stages: list[tuple[str, str]] = []
    try:
        result = await run_boot(
            backend, shared, report=lambda s, d: stages.append((s, d)),
            local=LocalKeyProvider(tmp / "no-local-keys.json"), os_image_hash=OS_IMAGE,
            dm_crypt=False, kms_trust=trust,
        )  # fmt: skip
    except BootFailed as e:
        return Boot(None, e, stages)
    return Boot(result, None, stages)


def refused(boot: Boot, check: str) -> str:
    """The boot stopped at ``keys`` naming `check`; nothing after identity ran."""
    assert boot.result is None and boot.error is not None, boot.stages
    assert boot.error.step == "keys", boot.error
    assert f"check {check} failed" in boot.error.reason, boot.error.reason
    assert [s for s, _ in boot.stages] == ["compose", "identity"]
    return boot.error.reason


def forged_keys(root_secret: bytes) -> dict[str, Any]:
    """The victim's app keys as a server with another root makes them."""
    key, sig = kms_issue_app_key(root_secret, VICTIM_APP)
    return {"k256_key": key.hex(), "k256_signature": sig.hex(), "disk_crypt_key": "11" * 32,
            "env_crypt_key": "22" * 32, "gateway_app_id": "",
            "os_image_hash": OS_IMAGE.hex()}  # fmt: skip


async def test_the_real_kms_works_and_unpinned_is_said_loudly(
    kms: Kms, pki: DevPki, webhook: Webhook, tmp_path: Path
) -> None:
    """Control: the real KMS passes every check; the keys chain to its root; the boot log
    says simulated, and that the root is not pinned (with the value to pin)."""
    boot = await boot_victim(kms.url, pki, trust_of(kms, pki), webhook, tmp_path)
    assert boot.result is not None, boot.error
    assert boot.result.keys.kms_root_public == kms.svc.root.k256_public()
    [detail] = [d for s, d in boot.stages if s == "keys"]
    assert "kms:rpc" in detail and "simulated" in detail
    assert "KMS root NOT PINNED" in detail and spki_of(kms.svc.ca_cert).hex() in detail


async def test_the_pinned_real_kms_works(
    kms: Kms, pki: DevPki, webhook: Webhook, tmp_path: Path
) -> None:
    """The app-compose pins the KMS root CA (key_provider_id): accepted, measured as such."""
    pin = spki_of(kms.svc.ca_cert)
    boot = await boot_victim(kms.url, pki, trust_of(kms, pki), webhook, tmp_path, pin=pin)
    assert boot.result is not None, boot.error
    assert boot.result.keys.provider_id == pin
    [detail] = [d for s, d in boot.stages if s == "keys"]
    assert "pinned by app-compose" in detail and "NOT PINNED" not in detail


async def test_certificate_without_kms_rpc_usage(
    kms: Kms, pki: DevPki, webhook: Webhook, tmp_path: Path, served: Any
) -> None:
    """A server certificate signed by the real KMS root CA, attested, serverAuth, but naming
    no ``kms:rpc`` usage: refused before GetAppKey is sent."""
    key = ec.generate_private_key(ec.SECP256R1())
    att = await make_cvm(pki, compose="attacker").attest(ratls_report_data(key.public_key()))
    cert = build_ratls_cert(key, att, subject="kms", alt_names=["localhost"],
                            issuer=(kms.svc.ca_cert, kms.svc.root.ca_key()),
                            usage_server_auth=True, not_before=0, not_after=2**31)  # fmt: skip
    fake = await served(
        FakeKms(kms.temp, kms.svc.meta(), lambda: {}), simcvm.pem(cert), simcvm.key_pem(key)
    )
    boot = await boot_victim(fake.url, pki, trust_of(kms, pki), webhook, tmp_path)
    assert "special usage is None" in refused(boot, "kms:rpc")
    assert "GetAppKey" not in fake.calls


async def test_signcert_certificate_of_another_app(
    kms: Kms, pki: DevPki, webhook: Webhook, tmp_path: Path, served: Any
) -> None:
    """An authorized app asks the real KMS's SignCert for a serverAuth certificate (chain:
    leaf, its app CA, the KMS root) and serves it as a KMS: refused, no request sent."""
    attacker = make_cvm(pki)  # an app the KMS's webhook authorizes
    key = ec.generate_private_key(ec.SECP256R1())
    att = encode_attestation(await attacker.attest(ratls_report_data(key.public_key())))
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    config = CertConfig(subject="kms", subject_alt_names=("localhost",), usage_server_auth=True)
    raw = encode_csr(Csr("please sign cert:", spki, config), att)
    body = {"api_version": 2, "csr": raw.hex(), "vm_config": VM_CONFIG,
            "signature": key.sign(raw, ec.ECDSA(hashes.SHA256())).hex()}  # fmt: skip
    async with KmsClient(kms.url, ca_pem=kms.temp["ca_cert"]) as c:
        chain = (await c.call("SignCert", body))["certificate_chain"]
    fake = await served(FakeKms(kms.temp, kms.svc.meta(), lambda: {}), "".join(chain),
                        simcvm.key_pem(key))  # fmt: skip
    boot = await boot_victim(fake.url, pki, trust_of(kms, pki), webhook, tmp_path)
    assert "'app:custom'" in refused(boot, "kms:rpc")
    assert "GetAppKey" not in fake.calls


async def test_real_kms_certificate_but_keys_of_another_root(
    kms: Kms, pki: DevPki, webhook: Webhook, tmp_path: Path, served: Any
) -> None:
    """A server holding the real KMS's own kms:rpc certificate and key hands out an app key
    signed by another root: the signature does not recover the attested root; unused."""
    chain, key_pem = await kms.svc.rpc_identity()
    other_root = os.urandom(32)
    fake = FakeKms(kms.temp, kms.svc.meta(), lambda: forged_keys(other_root))
    await served(fake, chain, key_pem)
    boot = await boot_victim(fake.url, pki, trust_of(kms, pki), webhook, tmp_path)
    assert "not the KMS root" in refused(boot, "k256-signature")
    assert fake.calls.count("GetAppKey") == 1


async def test_real_kms_certificate_but_another_claimed_root(
    kms: Kms, pki: DevPki, webhook: Webhook, tmp_path: Path, served: Any
) -> None:
    """The same server also claims its own k256 root in GetMeta, with a bootstrap quote
    binding it to the real CA from a TD it runs: not the KMS's app, refused; keys unused."""
    chain, key_pem = await kms.svc.rpc_identity()
    other_root = os.urandom(32)
    other_pub = k256_public(other_root)
    ca_spki = spki_of(kms.svc.ca_cert)
    bound = kms_bootstrap_report_data(ca_spki, other_pub)  # as the real KMS binds its root
    att = encode_attestation(await make_cvm(pki, compose="attacker").attest(bound))
    meta = {
        **kms.svc.meta(),
        "k256_pubkey": other_pub.hex(),
        "bootstrap_info": {
            "ca_pubkey": ca_spki.hex(),
            "k256_pubkey": other_pub.hex(),
            "attestation": att.hex(),
        },
    }
    fake = await served(FakeKms(kms.temp, meta, lambda: forged_keys(other_root)), chain, key_pem)
    boot = await boot_victim(fake.url, pki, trust_of(kms, pki), webhook, tmp_path)
    assert "another app than the KMS" in refused(boot, "root-attestation")


async def test_another_complete_kms_is_refused_when_the_compose_pins_this_one(
    kms: Kms, store: EventStore, pki: DevPki, webhook: Webhook, tmp_path: Path
) -> None:
    """The host runs a second, genuine KMS cluster (its own roots, attested, kms:rpc) and
    points the CVM at it: the app-compose pins the first cluster's root CA, so the second
    is refused at root-pin before any key request. (Unpinned, it would be accepted, as in
    dstack; the boot log says so, see the first test.)"""
    agent, keyfile = kms_guest(pki, tmp_path, "host-kms")
    other = await KmsService.open(
        store, KmsSettings(cluster="hosts-own", root_ca_der=pki.root_der, instance_id="h"),
        backend=WebhookBackend(webhook.url), collateral=CollateralBox(pki), keyfile=keyfile,
        attester=agent,
    )  # fmt: skip
    async with other, serve_kms(other) as url:
        pin = spki_of(kms.svc.ca_cert)
        boot = await boot_victim(url, pki, trust_of(kms, pki), webhook, tmp_path, pin=pin)
        refused(boot, "root-pin")
        unpinned = await boot_victim(url, pki, trust_of(kms, pki), webhook, tmp_path)
        assert unpinned.result is not None  # what the pin is for
        assert unpinned.result.keys.kms_root_public == other.root.k256_public()
    assert isinstance(other.backend, WebhookBackend)
    await other.backend.close()


def test_sys_config_cannot_pin_for_the_app() -> None:
    """sys-config's key_provider_id and kms_ca are the host's: never a pin of their own."""
    compose = json.dumps({"name": "x"}).encode()
    sysc = json.dumps({"key_provider_id": "ab" * 20, "kms_ca": "PEM"}).encode()
    assert plan_boot(HostShared(app_compose=compose, sys_config=sysc)).pinned_provider_id == b""
