"""A key request while the log cannot take it (found by bench.chaos: the stream had no leader
during an election): a 503 naming the log, a warning line, no traceback, nothing released."""

from __future__ import annotations

import json
import logging

import pytest

from pydstack.actors.kms import KmsClient
from pydstack.adapters.nats import NatsServer
from pydstack.adapters.tdx.pki import DevPki

from .conftest import VM_CONFIG, Kms, bound_identity, make_cvm


@pytest.mark.timeout(120)
async def test_a_key_request_the_log_cannot_take_is_a_503_not_a_traceback(
    kms: Kms, pki: DevPki, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    ident = await bound_identity(make_cvm(pki, instance_id=b"\x71" * 20), kms.temp)
    nats_server.kill()  # the log is gone: the request's KeyRequested cannot be appended
    caplog.set_level(logging.ERROR, logger="aiohttp.server")
    async with KmsClient(kms.url, ca_pem=kms.temp["ca_cert"], identity=ident) as c:
        status, body = await c.raw(
            "GetAppKey", json.dumps({"api_version": 1, "vm_config": VM_CONFIG}).encode()
        )
    assert status == 503, body
    assert "log is unavailable" in body["error"] and "retry" in body["error"]
    assert "app_key" not in body  # nothing released
    assert not [r for r in caplog.records if r.name == "aiohttp.server"]  # no traceback
