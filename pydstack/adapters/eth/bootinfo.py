"""BootInfo ↔ the contracts' ``AppBootInfo`` tuple, and the ABI the backend needs.

Pure: no chain access. dstack's BootInfo carries hex strings (with or without ``0x``, possibly
shorter than the field); like dstack's auth-eth they are left-padded to the field's width.
"""

from __future__ import annotations

from typing import Any, Final

from eth_utils.address import to_checksum_address

from pydstack.core.events.kms import BootInfo

from .errors import BootInfoError

__all__ = ["APP_BOOT_INFO_ABI", "KMS_AUTH_VIEW_ABI", "app_boot_info", "hex_field"]

_BOOT_COMPONENTS: Final = [
    {"name": "appId", "type": "address", "internalType": "address"},
    {"name": "composeHash", "type": "bytes32", "internalType": "bytes32"},
    {"name": "instanceId", "type": "address", "internalType": "address"},
    {"name": "deviceId", "type": "bytes32", "internalType": "bytes32"},
    {"name": "mrAggregated", "type": "bytes32", "internalType": "bytes32"},
    {"name": "mrSystem", "type": "bytes32", "internalType": "bytes32"},
    {"name": "osImageHash", "type": "bytes32", "internalType": "bytes32"},
    {"name": "tcbStatus", "type": "string", "internalType": "string"},
    {"name": "advisoryIds", "type": "string[]", "internalType": "string[]"},
]

APP_BOOT_INFO_ABI: Final[dict[str, Any]] = {
    "name": "bootInfo",
    "type": "tuple",
    "internalType": "struct AppBootInfo",
    "components": _BOOT_COMPONENTS,
}


def _verdict_view(name: str) -> dict[str, Any]:
    return {
        "type": "function",
        "name": name,
        "stateMutability": "view",
        "inputs": [APP_BOOT_INFO_ABI],
        "outputs": [
            {"name": "isAllowed", "type": "bool", "internalType": "bool"},
            {"name": "reason", "type": "string", "internalType": "string"},
        ],
    }


# The three views the KMS calls. Kept by hand so the KMS needs no compiler at run time; a test
# checks each entry against solc's ABI of contracts/DstackKms.sol and of dstack's own DstackKms.
KMS_AUTH_VIEW_ABI: Final[list[dict[str, Any]]] = [
    _verdict_view("isAppAllowed"),
    _verdict_view("isKmsAllowed"),
    {
        "type": "function",
        "name": "gatewayAppId",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "string", "internalType": "string"}],
    },
]


def hex_field(value: str, size: int, field: str) -> bytes:
    """Decode ``value`` (hex, optional 0x) left-padded to ``size`` bytes; empty means zero."""
    text = value[2:] if value[:2] in ("0x", "0X") else value
    if len(text) % 2:
        text = "0" + text
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise BootInfoError(f"boot info {field} is not hex: {value!r}") from None
    if len(raw) > size:
        raise BootInfoError(f"boot info {field} is {len(raw)} bytes, at most {size} fit: {value}")
    return raw.rjust(size, b"\0")


def app_boot_info(boot: BootInfo) -> tuple[object, ...]:
    """The ``AppBootInfo`` tuple for the contracts' ``isAppAllowed`` / ``isKmsAllowed``."""
    return (
        to_checksum_address(hex_field(boot.app_id, 20, "app_id")),
        hex_field(boot.compose_hash, 32, "compose_hash"),
        to_checksum_address(hex_field(boot.instance_id, 20, "instance_id")),
        hex_field(boot.device_id, 32, "device_id"),
        hex_field(boot.mr_aggregated, 32, "mr_aggregated"),
        hex_field(boot.mr_system, 32, "mr_system"),
        hex_field(boot.os_image_hash, 32, "os_image_hash"),
        boot.tcb_status,
        list(boot.advisory_ids),
    )
