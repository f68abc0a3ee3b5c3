"""The gateway's auth webhook body as dstack v0.5.11's gateway posts it (issue 16 item 7).

v0.5.11 `gateway/src/main_service/auth_client.rs` posts `serde_json` of `dstack-attest`'s
`AppInfo`: no `rename_all`, every field `#[serde(with = "hex_bytes")]` (lower-case hex, no
0x), in declaration order; `key_provider_info` is hex of the `key-provider` event payload.
"""

from __future__ import annotations

import pytest

from .given import key
from .test_registration import APP_A, Gateway, gateway, pki  # noqa: F401 - fixtures

# v0.5.11 `pub struct AppInfo`, field by field
DSTACK_APP_INFO_KEYS = [
    "app_id",
    "compose_hash",
    "instance_id",
    "device_id",
    "mr_system",
    "mr_aggregated",
    "os_image_hash",
    "key_provider_info",
]


@pytest.mark.timeout(60)
async def test_webhook_gets_dstacks_app_info_with_hex_key_provider(gateway: Gateway) -> None:  # noqa: F811
    """RegisterCvm posts dstack's AppInfo: its keys in its order, key_provider_info as hex."""
    cvm = gateway.cvm(APP_A, 1)  # its key-provider event's payload is b"{}" (simcvm)
    status, out = await gateway.post(await cvm.identity(gateway.ca), {"client_public_key": key(1)})
    assert status == 200, out
    body = gateway.webhook_calls[-1]
    assert list(body) == DSTACK_APP_INFO_KEYS
    assert body["key_provider_info"] == b"{}".hex()
    assert body["app_id"] == APP_A.hex() and body["instance_id"] == cvm.instance_id.hex()
    for value in body.values():
        assert value == value.lower() and not value.startswith("0x")
        bytes.fromhex(value)
