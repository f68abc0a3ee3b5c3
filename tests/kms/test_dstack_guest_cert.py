"""GetAppKey from a dstack v0.5.11 guest, its requests as dstack-util's
`request_app_keys_from_kms_url` sends them: GetTempCaCert without a client certificate (body
`null`, prost's `()` for `google.protobuf.Empty`), then GetAppKey at ``/prpc/GetAppKey?json``
with `generate_ra_cert`'s certificate (rcgen's 1975 notBefore, stripped event log, no EKU;
`dstack_guest.py`), the server's certificate naming the `kms:rpc` usage."""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.actors.kms.client import client_context, plain_context
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import ratls_report_data, special_usage
from pydstack.core.events import KeyIssued
from pydstack.core.kms import app_key_material

from .conftest import APP_ID, VM_CONFIG, Kms, make_cvm
from .dstack_guest import RCGEN_NOT_AFTER, generate_ra_cert


async def prpc(url: str, method: str, body: bytes, ctx: ssl.SSLContext) -> tuple[int, Any]:
    """dstack's `RaClient::request`: POST `<url>/prpc/<Method>?json`, no content type."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async with s.post(f"{url}/prpc/{method}?json", data=body) as resp:
            return resp.status, json.loads(await resp.read())


async def server_cert(url: str, ctx: ssl.SSLContext) -> x509.Certificate:
    """The KMS's leaf certificate, as dstack's `cert_validator` is handed it."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der)


@pytest.mark.parametrize("not_after", [None, RCGEN_NOT_AFTER], ids=["ra-tls-10y", "rcgen-4096"])
async def test_a_dstack_guests_kms_client_certificate_gets_the_app_keys(
    kms: Kms, pki: DevPki, not_after: int | None
) -> None:
    """The certificate dstack-util presents to GetAppKey is accepted: the keys are the app's,
    the decision is on the log with the attested identity."""
    status, tmp_ca = await prpc(kms.url, "GetTempCaCert", b"null", plain_context(None))
    assert status == 200 and set(tmp_ca) >= {"temp_ca_cert", "temp_ca_key", "ca_cert"}
    cvm = make_cvm(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    att = await cvm.attest(ratls_report_data(key.public_key()))
    identity = generate_ra_cert(tmp_ca, att, key, not_after=not_after)
    body = json.dumps({"api_version": 1, "vm_config": VM_CONFIG}).encode()
    ctx = client_context(tmp_ca["ca_cert"], identity)
    assert special_usage(await server_cert(kms.url, ctx)) == "kms:rpc"
    status, keys = await prpc(kms.url, "GetAppKey", body, ctx)
    assert status == 200, keys
    want = app_key_material(kms.svc.root, APP_ID, b"\x11" * 20)
    assert keys["disk_crypt_key"] == want.disk_crypt_key.hex()
    assert keys["env_crypt_key"] == want.env_crypt_key.hex()
    issued = (await kms.events())[-1]
    assert isinstance(issued, KeyIssued) and issued.boot_info.app_id == APP_ID.hex()
