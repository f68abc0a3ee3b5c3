"""RTMR3 of a boot that gets its keys from the real KMS (issue 16 item 6): dstack v0.5.11's
KMS-path events, in its order (``tests/vectors/dstack/rtmr3/cases.json``), with ``mr-kms`` the
verified KMS's ``mr_aggregated`` and ``os-image-hash`` the one the KMS checked and answered."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from dstack_sdk.dstack_client import GetQuoteResponse

from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.quote import parse_quote
from pydstack.core.kms import app_key_material
from pydstack_guest import LocalKeyProvider
from pydstack_guest.agent import GuestAgent, GuestConfig
from pydstack_guest.boot import HostShared, run_boot
from pydstack_guest.kms_trust import check_server, spki_of
from tests import images
from tests.adversarial.test_cvm_trusts_only_its_kms import trust_of
from tests.boot.test_rtmr3_dstack import BY_ID, log_json
from tests.kms.conftest import OS_IMAGE, VM_CONFIG, Kms, Webhook, kms, pki, webhook

__all__ = ["kms", "pki", "webhook"]  # the KMS suite's fixtures


async def _server_cert(url: str) -> bytes:
    """The DER certificate the KMS at `url` presents."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    _, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return bytes(der)


async def test_a_kms_boot_measures_mr_kms_and_the_kms_os_image_hash(
    kms: Kms, pki: DevPki, webhook: Webhook, tmp_path: Path
) -> None:
    compose = json.dumps({"manifest_version": 2, "name": "rtmr3", "runner": "docker-compose",
                          "kms_enabled": True}).encode()  # fmt: skip
    compose_hash = hashlib.sha256(compose).digest()
    webhook.config["apps"][compose_hash[:20].hex()] = {"composeHashes": [compose_hash.hex()]}
    backend = images.measured_backend(pki)
    sysc = {"kms_urls": [kms.url], "vm_config": VM_CONFIG}
    info = {"instance_id_seed": os.urandom(20).hex()}
    shared = HostShared(app_compose=compose, sys_config=json.dumps(sysc).encode(),
                        instance_info=json.dumps(info).encode())  # fmt: skip
    await run_boot(backend, shared, report=lambda s, d: None,
                   local=LocalKeyProvider(tmp_path / "none.json"), os_image_hash=OS_IMAGE,
                   dm_crypt=False, kms_trust=trust_of(kms, pki))  # fmt: skip
    log = [log_json(e) for e in backend.event_log() if e.imr == 3]
    assert [e["event"] for e in log] == [e["event"] for e in BY_ID["kms-ext4"]["event_log"]]
    payload = {e["event"]: bytes.fromhex(e["event_payload"]) for e in log}
    server = await check_server(await _server_cert(kms.url), kms.svc.ca_cert, trust_of(kms, pki))
    assert server.app_info is not None and payload["mr-kms"] == server.app_info.mr_aggregated
    assert payload["os-image-hash"] == OS_IMAGE
    assert json.loads(payload["key-provider"]) == {
        "name": "kms",
        "id": spki_of(kms.svc.ca_cert).hex(),
    }
    assert payload["storage-fs"] == b"plain"  # no dm-crypt: pydstack's value, said so
    quote, _ = backend.attest(bytes(64))
    sdk = GetQuoteResponse(quote="", event_log=json.dumps(log)).replay_rtmrs()[3]
    assert parse_quote(quote).report.rtmr3.hex() == sdk


async def test_a_no_instance_id_app_gets_its_keys_with_an_empty_instance_id(
    kms: Kms, pki: DevPki, webhook: Webhook, tmp_path: Path
) -> None:
    """dstack's no_instance_id: instance-id measured empty; the KMS derives the app's keys with
    an empty instance id (one disk key for every instance of the app, as dstack's) and signs
    its certificates."""
    compose = json.dumps({"manifest_version": 2, "name": "noid", "runner": "docker-compose",
                          "kms_enabled": True, "no_instance_id": True}).encode()  # fmt: skip
    compose_hash = hashlib.sha256(compose).digest()
    webhook.config["apps"][compose_hash[:20].hex()] = {"composeHashes": [compose_hash.hex()]}
    backend = images.measured_backend(pki)
    sysc = {"kms_urls": [kms.url], "vm_config": VM_CONFIG}
    shared = HostShared(app_compose=compose, sys_config=json.dumps(sysc).encode())
    result = await run_boot(backend, shared, report=lambda s, d: None,
                            local=LocalKeyProvider(tmp_path / "none.json"),
                            os_image_hash=OS_IMAGE, dm_crypt=False,
                            kms_trust=trust_of(kms, pki))  # fmt: skip
    log = [e for e in backend.event_log() if e.event == "instance-id"]
    assert [bytes(e.event_payload) for e in log] == [b""]
    want = app_key_material(kms.svc.root, compose_hash[:20], b"")
    assert result.keys.disk_crypt_key == want.disk_crypt_key
    # GetTlsKey after boot: the KMS's SignCert issues the app's certificate all the same.
    agent = GuestAgent(backend, result.keys, GuestConfig(vm_config=result.vm_config))
    key = ec.generate_private_key(ec.SECP256R1())
    out = await agent.tls_key(key, subject="noid", alt_names=[], usage_ra_tls=False,
                              usage_server_auth=True, usage_client_auth=False)  # fmt: skip
    leaf = x509.load_pem_x509_certificate(out["certificate_chain"][0].encode())
    assert leaf.public_key() == key.public_key()
    root = x509.load_pem_x509_certificate(out["certificate_chain"][-1].encode())
    assert root == kms.svc.ca_cert  # the chain ends at the KMS root: SignCert issued it
