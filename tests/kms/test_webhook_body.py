"""The KMS auth webhook body as dstack v0.5.11's KMS posts it (issue 16 item 7).

dstack's `kms/src/main_service/upgrade_authority.rs` posts its `BootInfo` with serde
`rename_all = "camelCase"`: `attestationMode` (its `AttestationMode`, "dstack-tdx" for TDX),
the byte fields as `serde_human_bytes` (lower-case hex, no 0x) in declaration order, then
`tcbStatus` and `advisoryIds`. `keyProviderInfo` is the attestation's `key-provider` runtime
event payload (`decode_app_info_ex(boottime_mr=false)`), empty when there is none.
"""

from __future__ import annotations

import json

import pytest

from pydstack.actors.kms import make_recheck
from pydstack.adapters.tdx.pki import DevPki
from pydstack.core.events import KeyIssued
from pydstack.core.kms import audit_kms_log

from .conftest import VM_CONFIG, Kms, Webhook, bound_identity, make_cvm

# v0.5.11 `struct BootInfo`, field by field, as serde_json writes it (declaration order).
DSTACK_BOOT_INFO_KEYS = [
    "attestationMode",
    "mrAggregated",
    "osImageHash",
    "mrSystem",
    "appId",
    "composeHash",
    "instanceId",
    "deviceId",
    "keyProviderInfo",
    "tcbStatus",
    "advisoryIds",
]
HEX_FIELDS = DSTACK_BOOT_INFO_KEYS[1:9]
# what dstack's guest emits once it holds KMS keys (`emit_key_provider_info`: serde_json of
# KeyProviderInfo { name, id })
KMS_PROVIDER = json.dumps({"name": "kms", "id": "02" + "ab" * 32}, separators=(",", ":")).encode()


async def _get_app_key(kms: Kms, identity: tuple[str, str]) -> None:
    async with kms.client(identity) as c:
        await c.call("GetAppKey", {"api_version": 1, "vm_config": VM_CONFIG})


@pytest.mark.parametrize("provider", [KMS_PROVIDER, b""], ids=["after-boot", "first-boot"])
async def test_webhook_body_is_dstacks_boot_info(
    kms: Kms, pki: DevPki, webhook: Webhook, provider: bytes
) -> None:
    """GetAppKey posts dstack's BootInfo: its keys in its order, keyProviderInfo as hex."""
    cvm = make_cvm(pki)
    if provider:
        cvm.backend.emit_event("key-provider", provider)
    await _get_app_key(kms, await bound_identity(cvm, kms.temp))
    body = webhook.seen[-1]
    assert list(body) == DSTACK_BOOT_INFO_KEYS
    assert body["attestationMode"] == "dstack-tdx"
    assert body["keyProviderInfo"] == provider.hex()
    for name in HEX_FIELDS:
        value = body[name]
        assert isinstance(value, str) and value == value.lower() and not value.startswith("0x")
        bytes.fromhex(value)
    assert body["tcbStatus"] == "UpToDate" and body["advisoryIds"] == []


async def test_key_provider_is_recorded_and_audits(kms: Kms, pki: DevPki) -> None:
    """The KeyIssued names the key provider the backend saw; the audit re-derives it."""
    cvm = make_cvm(pki)
    cvm.backend.emit_event("key-provider", KMS_PROVIDER)
    await _get_app_key(kms, await bound_identity(cvm, kms.temp))
    evs = await kms.events()
    issued = [e for e in evs if isinstance(e, KeyIssued)][-1]
    assert issued.boot_info.key_provider_info == KMS_PROVIDER.hex()
    assert audit_kms_log(evs, make_recheck(kms.collateral.get, pki.root_der)) == []
