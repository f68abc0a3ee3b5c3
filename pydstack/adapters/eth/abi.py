"""dstack v0.5.11's DstackKms / DstackApp ABI, the parts the KMS and the CLI call.

Kept by hand so nothing but ``kms contract deploy`` needs a compiler; ``tests/eth`` checks every
entry against solc's ABI of dstack's own sources and of ``contracts/``.
"""

from __future__ import annotations

from typing import Any, Final

from .bootinfo import KMS_AUTH_VIEW_ABI

__all__ = ["APP_ABI", "KMS_ABI"]


def _params(types: str) -> list[dict[str, Any]]:
    out = []
    for i, spec in enumerate(t for t in types.split(",") if t):
        kind, _, indexed = spec.partition(" ")
        entry: dict[str, Any] = {"name": f"arg{i}", "type": kind}
        if indexed:
            entry["indexed"] = True
        out.append(entry)
    return out


def _fn(name: str, inputs: str = "", outputs: str = "", mutability: str = "nonpayable") -> Any:
    return {
        "type": "function",
        "name": name,
        "stateMutability": mutability,
        "inputs": _params(inputs),
        "outputs": _params(outputs),
    }


def _view(name: str, inputs: str, outputs: str) -> Any:
    return _fn(name, inputs, outputs, "view")


def _event(name: str, inputs: str) -> Any:
    return {"type": "event", "name": name, "anonymous": False, "inputs": _params(inputs)}


def _error(name: str, inputs: str = "") -> Any:
    return {"type": "error", "name": name, "inputs": _params(inputs)}


_OWNABLE: Final = [
    _view("owner", "", "address"),
    _fn("transferOwnership", "address"),
    _error("OwnableUnauthorizedAccount", "address"),
    _error("OwnableInvalidOwner", "address"),
    _error("InvalidInitialization"),
]

KMS_ABI: Final[list[dict[str, Any]]] = [
    *KMS_AUTH_VIEW_ABI,
    *_OWNABLE,
    _view("registeredApps", "address", "bool"),
    _view("allowedOsImages", "bytes32", "bool"),
    _view("kmsAllowedAggregatedMrs", "bytes32", "bool"),
    _view("kmsAllowedDeviceIds", "bytes32", "bool"),
    _view("appImplementation", "", "address"),
    _fn("registerApp", "address"),
    _fn("setGatewayAppId", "string"),
    _fn("deployAndRegisterApp", "address,bool,bool,bool,bytes32,bytes32", "address"),
    _fn("addOsImageHash", "bytes32"),
    _fn("removeOsImageHash", "bytes32"),
    _fn("addKmsAggregatedMr", "bytes32"),
    _fn("removeKmsAggregatedMr", "bytes32"),
    _fn("addKmsDevice", "bytes32"),
    _fn("removeKmsDevice", "bytes32"),
    _event("AppDeployedViaFactory", "address indexed,address indexed"),
]

APP_ABI: Final[list[dict[str, Any]]] = [
    KMS_AUTH_VIEW_ABI[0],  # isAppAllowed(AppBootInfo)
    *_OWNABLE,
    _view("allowedComposeHashes", "bytes32", "bool"),
    _view("allowedDeviceIds", "bytes32", "bool"),
    _view("allowAnyDevice", "", "bool"),
    _view("requireTcbUpToDate", "", "bool"),
    _view("version", "", "uint256"),
    _fn("addComposeHash", "bytes32"),
    _fn("removeComposeHash", "bytes32"),
    _fn("addDevice", "bytes32"),
    _fn("removeDevice", "bytes32"),
    _fn("setAllowAnyDevice", "bool"),
    _fn("setRequireTcbUpToDate", "bool"),
]
