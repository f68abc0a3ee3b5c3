"""`pydstack kms contract show` / `pydstack app contract show`: what a DstackKms / DstackApp
allows, read at the latest block (no sender needed).

    pydstack kms contract show --kms-contract ADDR --os-image HASH --json
    pydstack app contract show APP_ID --compose app-compose.json --json
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import click

from ._common import json_option
from .contract import (
    _F,
    _address,
    _app_argument,
    _compose_option,
    _errors,
    _hex32,
    _kms_contract_option,
    _out,
    _web3,
    app_contract,
    kms_contract,
)


def _read_options(f: _F) -> _F:
    return click.option(
        "--eth-rpc-url", default="http://127.0.0.1:8545", show_default=True,
        envvar="PYDSTACK_ETH_RPC_URL", help="the chain's JSON-RPC endpoint",
    )(f)  # fmt: skip


@kms_contract.command("show")
@_read_options
@_kms_contract_option
@click.option("--os-image", "os_images", multiple=True, metavar="HASH", help="is it allowed?")
@click.option("--mr-aggregated", "mrs", multiple=True, metavar="HEX", help="is it allowed?")
@click.option("--device-id", "devices", multiple=True, metavar="HEX", help="is it allowed?")
@click.option("--app", "apps", multiple=True, metavar="APP_ID", help="is it registered?")
@json_option
def kms_show(
    as_json: bool, os_images: tuple[str, ...], mrs: tuple[str, ...], devices: tuple[str, ...],
    apps: tuple[str, ...], **o: Any,
) -> None:  # fmt: skip
    """The DstackKms's owner, gateway app id and app implementation, and whether the values
    given are allowed (a mapping cannot be listed: its history is in the contract's events)."""
    from pydstack.adapters.eth import KmsAdmin

    kms = KmsAdmin(_web3(o["eth_rpc_url"]), _address(o["kms_contract"], "--kms-contract"), "")
    checks = [
        ("os_image", "allowedOsImages", [_hex32(h, "--os-image") for h in os_images]),
        ("mr_aggregated", "kmsAllowedAggregatedMrs", [_hex32(m, "--mr-aggregated") for m in mrs]),
        ("device_id", "kmsAllowedDeviceIds", [_hex32(d, "--device-id") for d in devices]),
        ("app", "registeredApps", [_address(a, "--app") for a in apps]),
    ]
    with _errors():
        data: dict[str, Any] = {
            "kms_contract": kms.address, "owner": kms.owner(),
            "gateway_app_id": kms.gateway_app_id(),
            "app_implementation": str(kms.call("appImplementation")),
        }  # fmt: skip
        for key, view, values in checks:
            if values:
                data[key] = {
                    v: bool(kms.call(view, v if key == "app" else bytes.fromhex(v[2:])))
                    for v in values
                }
    text = "\n".join(
        f"{k:18} {v}" if not isinstance(v, dict)
        else "\n".join(f"{k:18} {x} {'allowed' if ok else 'NOT allowed'}" for x, ok in v.items())
        for k, v in data.items()
    )  # fmt: skip
    _out(as_json, data, text)


@app_contract.command("show")
@_read_options
@_app_argument
@click.option("--compose-hash", "hashes", multiple=True, metavar="HEX", help="is it allowed?")
@_compose_option
@click.option("--device-id", "devices", multiple=True, metavar="HEX", help="is it allowed?")
@json_option
def app_show(
    as_json: bool, hashes: tuple[str, ...], compose: Path | None, devices: tuple[str, ...],
    **o: Any,
) -> None:  # fmt: skip
    """APP_ID's DstackApp: owner, allowAnyDevice, requireTcbUpToDate, and whether the compose
    hashes and devices given are allowed."""
    from pydstack.adapters.eth import AppAdmin

    app = AppAdmin(_web3(o["eth_rpc_url"]), _address(o["app_id"], "APP_ID"), "")
    wanted = [_hex32(h, "--compose-hash") for h in hashes]
    if compose is not None:
        wanted.append("0x" + hashlib.sha256(compose.read_bytes()).hexdigest())
    device_values = [_hex32(d, "--device-id") for d in devices]
    with _errors():
        data: dict[str, Any] = {
            "app_id": app.address[2:].lower(), "app_contract": app.address,
            "owner": app.owner(), "allow_any_device": bool(app.call("allowAnyDevice")),
            "require_tcb_up_to_date": bool(app.call("requireTcbUpToDate")),
        }  # fmt: skip
        if wanted:
            data["compose_hash"] = {h: app.is_compose_hash_allowed(h) for h in wanted}
        if device_values:
            data["device_id"] = {d: app.is_device_allowed(d) for d in device_values}
    text = "\n".join(
        f"{k:22} {v}" if not isinstance(v, dict)
        else "\n".join(f"{k:22} {x} {'allowed' if ok else 'NOT allowed'}" for x, ok in v.items())
        for k, v in data.items()
    )  # fmt: skip
    _out(as_json, data, text)
