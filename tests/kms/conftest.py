"""KMS test rig: real nats-server, a KMS on a real TLS socket, simulated CVMs, a real webhook.

Everything is real except the TDX hardware: quotes come from the simulator's dev PKI, which
dcap-qvl verifies once the dev root is trusted (the KMS is configured with it).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.actors.kms import (
    KeyProviderSealKey,
    KmsClient,
    KmsService,
    KmsSettings,
    RootKeyFile,
    WebhookBackend,
    serve_kms,
)
from pydstack.adapters.nats import EventStore
from pydstack.adapters.nats.objectstore import EvidenceBucket
from pydstack.adapters.tdx.attestation import Attestation
from pydstack.adapters.tdx.backend import SimulatorBackend
from pydstack.adapters.tdx.collateral import Collateral, collateral_from_json
from pydstack.adapters.tdx.eventlog import runtime_events_of
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import build_ratls_cert, ratls_report_data
from pydstack.adapters.tdx.simulator import QuoteSimulator, TdMeasurements
from pydstack.core.events import KeyRequested, decode_body, open_envelope, subject
from pydstack.core.kms import boot_info_from_webhook
from pydstack.core.kms.blobs import with_blob
from pydstack.core.measure import ImageParts, VmShape
from pydstack_guest import GuestAgent, GuestConfig, LocalKeyProvider, create_dev_app_keys
from tests import images

CLUSTER = "test"
# the image the KMS measures test CVMs against (registered by the `kms` fixture)
OS_IMAGE = images.OS_IMAGE
VM_CONFIG = images.TEST_VM_CONFIG
COMPOSE = '{"manifest_version":2,"name":"app","runner":"docker-compose"}'
COMPOSE_HASH = hashlib.sha256(COMPOSE.encode()).digest()
APP_ID = COMPOSE_HASH[:20]
DEBUG_ATTRIBUTES = bytes.fromhex("0100001000000000")


@pytest.fixture(scope="session")
def pki() -> DevPki:
    return DevPki.generate()


class CollateralBox:
    """The KMS's collateral source; a test may switch the platform's TCB status."""

    def __init__(self, pki: DevPki) -> None:
        self.pki = pki
        self.status = "UpToDate"
        self.unavailable = False  # a PCCS that does not answer
        self._cache: dict[str, Collateral] = {}

    def get(self, _quote: bytes = b"") -> Collateral:
        if self.status not in self._cache:
            text = self.pki.collateral_json(int(time.time()), tcb_status=self.status)
            self._cache[self.status] = collateral_from_json(text)
        return self._cache[self.status]

    async def __call__(self, quote: bytes) -> Collateral:
        if self.unavailable:
            raise ConnectionError("PCCS at https://pccs.test did not answer")
        return self.get(quote)


@dataclass
class Cvm:
    backend: SimulatorBackend
    sys_config: str

    async def attest(self, report_data: bytes) -> Attestation:
        data = report_data.ljust(64, b"\x00")
        quote, log = self.backend.attest(data)
        return Attestation(quote, tuple(log), tuple(runtime_events_of(log)), data, self.sys_config)


def make_cvm(
    pki: DevPki,
    *,
    compose: str = COMPOSE,
    app_id: bytes | None = None,
    instance_id: bytes = b"\x11" * 20,
    debug: bool = False,
    mr_td: bytes | None = None,
    parts: ImageParts = images.TEST_PARTS,
    shape: VmShape = images.TEST_SHAPE,
) -> Cvm:
    """A simulated CVM booted the way dstack boots up to the KMS request: measured as the
    registered test image (`parts`) in TEST_VM_CONFIG's shape (`shape`), unless `mr_td`
    names another firmware's MRTD."""
    compose_hash = hashlib.sha256(compose.encode()).digest()
    m = TdMeasurements(td_attributes=DEBUG_ATTRIBUTES) if debug else TdMeasurements()
    backend = images.measured_backend(pki, parts=parts, shape=shape, td=m)
    if mr_td is not None:
        backend = SimulatorBackend(QuoteSimulator(pki), msgspec.structs.replace(m, mr_td=mr_td))
    for name, payload in [
        ("system-preparing", b""),
        ("app-id", app_id if app_id is not None else compose_hash[:20]),
        ("compose-hash", compose_hash),
        ("instance-id", instance_id),
        ("boot-mr-done", b""),
    ]:
        backend.emit_event(name, payload)
    return Cvm(backend, json.dumps({"vm_config": VM_CONFIG}))


def client_cert(
    temp: dict[str, Any],
    att: Attestation | None,
    key: ec.EllipticCurvePrivateKey,
    *,
    not_before: int | None = None,
) -> tuple[str, str]:
    """An RA-TLS client certificate under the KMS temp CA carrying `att` as given."""
    ca = x509.load_pem_x509_certificate(temp["temp_ca_cert"].encode())
    ca_key = serialization.load_pem_private_key(temp["temp_ca_key"].encode(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    nb = int(time.time()) - 60 if not_before is None else not_before
    cert = build_ratls_cert(
        key, att, subject="test client", issuer=(ca, ca_key), usage_client_auth=True,
        not_before=nb, not_after=nb + 3 * 86400,
    )  # fmt: skip
    chain = cert.public_bytes(serialization.Encoding.PEM).decode() + temp["temp_ca_cert"]
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return chain, key_pem


async def bound_identity(cvm: Cvm, temp: dict[str, Any]) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    return client_cert(temp, await cvm.attest(ratls_report_data(key.public_key())), key)


@dataclass
class Webhook:
    """auth-simple's rules, served by aiohttp; `config` may change between requests."""

    url: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    seen: list[dict[str, Any]] = field(default_factory=list)

    def check(self, body: dict[str, Any], is_kms: bool) -> dict[str, Any]:
        self.seen.append(body)
        c = self.config
        boot = boot_info_from_webhook(body)
        gw = c.get("gatewayAppId", "")
        if boot.tcb_status not in c.get("allowedTcbStatuses", ["UpToDate"]):
            return {"isAllowed": False, "reason": "TCB status is not allowed", "gatewayAppId": gw}
        if boot.os_image_hash not in c.get("osImages", []):
            return {"isAllowed": False, "reason": "OS image is not allowed", "gatewayAppId": gw}
        if is_kms:
            ok = c.get("kms", {}).get("allowAny", False)
            reason = "" if ok else "KMS not allowed"
        else:
            app = c.get("apps", {}).get(boot.app_id)
            ok = app is not None and boot.compose_hash in app["composeHashes"]
            reason = "" if ok else "compose hash not allowed"
        return {"isAllowed": ok, "reason": reason, "gatewayAppId": gw}


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook(
        config={
            "gatewayAppId": "gw-app",
            "osImages": [OS_IMAGE.hex()],
            "apps": {APP_ID.hex(): {"composeHashes": [COMPOSE_HASH.hex()]}},
            "kms": {"allowAny": True},
        }
    )

    async def app_route(request: web.Request) -> web.Response:
        return web.json_response(hook.check(await request.json(), False))

    async def kms_route(request: web.Request) -> web.Response:
        return web.json_response(hook.check(await request.json(), True))

    app = web.Application()
    app.router.add_post("/bootAuth/app", app_route)
    app.router.add_post("/bootAuth/kms", kms_route)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    hook.url = f"http://127.0.0.1:{port}"
    yield hook
    await runner.cleanup()


def kms_guest(pki: DevPki, tmp: Path, name: str) -> tuple[GuestAgent, RootKeyFile]:
    """The KMS's own simulated CVM (attests its RPC cert) and its sealed key file."""
    keys, text = create_dev_app_keys(hashlib.sha256(name.encode()).digest()[:20], now=0)
    (tmp / f"{name}-appkeys.json").write_text(text)
    backend = SimulatorBackend(
        QuoteSimulator(pki), TdMeasurements(mr_td=hashlib.sha384(b"kms image").digest())
    )
    backend.emit_event("app-id", hashlib.sha256(name.encode()).digest()[:20])
    backend.emit_event("instance-id", hashlib.sha256(name.encode()).digest()[:20])
    agent = GuestAgent(backend, keys, GuestConfig(vm_config=VM_CONFIG))
    seal = KeyProviderSealKey(LocalKeyProvider(tmp / f"{name}-appkeys.json"))
    return agent, RootKeyFile(tmp / f"{name}-root.sealed", CLUSTER, seal)


@dataclass
class Kms:
    svc: KmsService
    url: str
    store: EventStore
    collateral: CollateralBox
    temp: dict[str, Any]

    async def events(self) -> list[Any]:
        """The cluster's events as the auditor reads them: a lean KeyRequested with its
        attestation fetched from the evidence bucket (only if it hashes right)."""
        records, _ = await self.store.read_aggregate(subject("kms", CLUSTER))
        bucket = EvidenceBucket.of(self.store)
        out = []
        for r in records:
            ev = decode_body(open_envelope(r.data))
            if isinstance(ev, KeyRequested) and ev.attestation_sha256:
                ev = with_blob(ev, await bucket.get(ev.attestation_sha256))
            out.append(ev)
        return out

    def client(self, identity: tuple[str, str] | None = None) -> KmsClient:
        return KmsClient(self.url, ca_pem=self.temp["ca_cert"], identity=identity)


@pytest.fixture
async def kms(
    store: EventStore, pki: DevPki, webhook: Webhook, tmp_path: Path
) -> AsyncIterator[Kms]:
    box = CollateralBox(pki)
    agent, keyfile = kms_guest(pki, tmp_path, "kms-a")
    await images.register_test_image(store)
    svc = await KmsService.open(
        store, KmsSettings(cluster=CLUSTER, root_ca_der=pki.root_der, instance_id="kms-a"),
        backend=WebhookBackend(webhook.url), collateral=box, keyfile=keyfile, attester=agent,
    )  # fmt: skip
    async with svc, serve_kms(svc) as url:
        yield Kms(svc, url, store, box, svc.temp_ca())
    assert isinstance(svc.backend, WebhookBackend)
    await svc.backend.close()
