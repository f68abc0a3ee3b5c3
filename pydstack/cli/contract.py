"""`pydstack kms contract …` and `pydstack app contract …`: the on-chain policy the KMS's `eth`
backend reads, in dstack v0.5.11's DstackKms / DstackApp ABI (so these also administer
contracts dstack's own scripts deployed).

    pydstack kms contract deploy --eth-rpc-url URL --private-key-file owner.key --json
    pydstack kms contract add-os-image --kms-contract ADDR OS_IMAGE_HASH
    pydstack kms contract add-kms-measurement --kms-contract ADDR --mr-aggregated HEX \
        --device-id HEX
    pydstack app contract deploy --kms-contract ADDR --compose app-compose.json --allow-any-device
    pydstack app contract add-compose-hash APP_ID COMPOSE_HASH   # APP_ID: the app's contract
    pydstack app contract add-device APP_ID DEVICE_ID

Transactions are signed with `--private-key-file` (hex key, mode 0600; never on the command
line) or sent `--from` an account the node itself unlocks (a dev node such as anvil).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ._common import json_option

if TYPE_CHECKING:
    from pydstack.adapters.eth import AppAdmin, KmsAdmin, Sender

_F = TypeVar("_F", bound=Callable[..., Any])


def _chain_options(f: _F) -> _F:
    f = click.option(
        "--from", "from_address", default="", metavar="ADDR",
        help="send from this account, which the node unlocks (dev nodes such as anvil)",
    )(f)  # fmt: skip
    f = click.option(
        "--private-key-file", type=click.Path(dir_okay=False), envvar="PYDSTACK_ETH_KEY_FILE",
        default=None, help="sign with this key (hex, mode 0600) [env PYDSTACK_ETH_KEY_FILE]",
    )(f)  # fmt: skip
    f = click.option(
        "--eth-rpc-url", default="http://127.0.0.1:8545", show_default=True,
        envvar="PYDSTACK_ETH_RPC_URL", help="the chain's JSON-RPC endpoint",
    )(f)  # fmt: skip
    return f


def _kms_contract_option(f: _F) -> _F:
    return click.option(
        "--kms-contract", required=True, envvar="PYDSTACK_KMS_CONTRACT", metavar="ADDR",
        help="the DstackKms contract [env PYDSTACK_KMS_CONTRACT]",
    )(f)  # fmt: skip


@contextmanager
def _errors() -> Iterator[None]:
    """The adapter's errors as one line and exit 1."""
    from pydstack.adapters.eth import EthError
    from pydstack.adapters.secretfile import SecretFileError

    try:
        yield
    except (EthError, SecretFileError) as exc:
        raise click.ClickException((str(exc).splitlines() or [""])[0][:400]) from None


def _sender(private_key_file: str | None, from_address: str) -> Sender:
    if bool(private_key_file) == bool(from_address):
        raise click.UsageError(
            "give exactly one of --private-key-file FILE (hex key, mode 0600) and --from ADDR "
            "(an account the node unlocks)"
        )
    if from_address:
        return _address(from_address, "--from")
    from eth_account import Account

    from pydstack.adapters.secretfile import read_secret

    assert private_key_file is not None
    with _errors():
        text = read_secret(private_key_file).decode("ascii", "replace").strip()
    try:
        account: Sender = Account.from_key(text)
    except (ValueError, TypeError):
        raise click.BadParameter(
            f"{private_key_file} holds no hex private key", param_hint="--private-key-file"
        ) from None
    return account


def _address(value: str, hint: str) -> str:
    from eth_utils.address import is_address, to_checksum_address

    if not is_address(value):
        raise click.BadParameter(
            f"{value!r} is not an address (0x + 40 hex digits)", param_hint=hint
        )
    return str(to_checksum_address(value))


def _hex32(value: str, hint: str) -> str:
    text = value.removeprefix("0x").removeprefix("0X").lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise click.BadParameter(f"{value!r} is not 32 bytes of hex (64 digits)", param_hint=hint)
    return "0x" + text


def _web3(url: str) -> Any:
    from web3 import Web3

    if not url.startswith(("http://", "https://")):
        raise click.BadParameter(f"{url!r} is not an http(s) URL", param_hint="--eth-rpc-url")
    return Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 30}))


def _kms(o: dict[str, Any]) -> KmsAdmin:
    from pydstack.adapters.eth import KmsAdmin

    sender = _sender(o["private_key_file"], o["from_address"])
    return KmsAdmin(_web3(o["eth_rpc_url"]), _address(o["kms_contract"], "--kms-contract"), sender)


def _app(o: dict[str, Any]) -> AppAdmin:
    from pydstack.adapters.eth import AppAdmin

    sender = _sender(o["private_key_file"], o["from_address"])
    return AppAdmin(_web3(o["eth_rpc_url"]), _address(o["app_id"], "APP_ID"), sender)


def _out(as_json: bool, data: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(data) if as_json else text)


# -- pydstack kms contract ----------------------------------------------------------------------


@click.group("contract")
def kms_contract() -> None:
    """The KMS cluster's DstackKms contract (OS images, KMS measurements, apps)."""


@kms_contract.command("deploy")
@_chain_options
@click.option("--owner", default="", metavar="ADDR", help="[default: the sender]")
@click.option("--gateway-app-id", default="", help="set the contract's gatewayAppId")
@json_option
def kms_deploy(as_json: bool, **o: Any) -> None:
    """Compile contracts/ and deploy a DstackKms (and the DstackApp implementation its app
    factory clones); prints the address to pass as --kms-contract."""
    from pydstack.adapters.eth import KmsAdmin, compile_contracts

    sender = _sender(o["private_key_file"], o["from_address"])
    owner = _address(o["owner"], "--owner") if o["owner"] else None
    with _errors():
        artifacts = compile_contracts(cache_dir=_solc_cache())
        kms = KmsAdmin.deploy(_web3(o["eth_rpc_url"]), artifacts, sender=sender, owner=owner)
        if o["gateway_app_id"]:
            kms.set_gateway_app_id(o["gateway_app_id"])
        implementation = str(kms.call("appImplementation"))
        owner_now = kms.owner()
    _out(
        as_json,
        {"kms_contract": kms.address, "app_implementation": implementation, "owner": owner_now},
        f"DstackKms {kms.address} (owner {owner_now}, app implementation {implementation})",
    )


def _solc_cache() -> Path:
    import os

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pydstack" / "solc"


@kms_contract.command("add-os-image")
@_chain_options
@_kms_contract_option
@click.argument("os_image_hash")
@json_option
def kms_add_os_image(as_json: bool, os_image_hash: str, **o: Any) -> None:
    """Allow OS_IMAGE_HASH (64 hex digits, e.g. from `pydstack image registered`) for apps and
    KMS replicas."""
    value = _hex32(os_image_hash, "OS_IMAGE_HASH")
    kms = _kms(o)
    with _errors():
        kms.add_os_image(value)
    _out(as_json, {"kms_contract": kms.address, "os_image_hash": value},
         f"os image {value} allowed by {kms.address}")  # fmt: skip


@kms_contract.command("add-kms-measurement")
@_chain_options
@_kms_contract_option
@click.option("--mr-aggregated", "mrs", multiple=True, metavar="HEX", help="repeatable")
@click.option("--device-id", "devices", multiple=True, metavar="HEX", help="repeatable")
@json_option
def kms_add_measurement(
    as_json: bool, mrs: tuple[str, ...], devices: tuple[str, ...], **o: Any
) -> None:
    """Allow a KMS replica's aggregated MR and/or device id (isKmsAllowed needs both, and its
    OS image); a refused KMS names the value it lacks when it fails to start."""
    if not mrs and not devices:
        raise click.UsageError("give --mr-aggregated HEX and/or --device-id HEX")
    mr_values = [_hex32(m, "--mr-aggregated") for m in mrs]
    device_values = [_hex32(d, "--device-id") for d in devices]
    kms = _kms(o)
    with _errors():
        for mr in mr_values:
            kms.add_kms_mr(mr)
        for device in device_values:
            kms.add_kms_device(device)
    _out(
        as_json,
        {"kms_contract": kms.address, "mr_aggregated": mr_values, "device_id": device_values},
        f"{kms.address} allows KMS MRs {mr_values} and devices {device_values}",
    )


# -- pydstack app contract ----------------------------------------------------------------------


@click.group("contract")
def app_contract() -> None:
    """An app's own DstackApp contract; its address is the app id."""


def _compose_hash(compose: Path | None, compose_hash: str | None, hint: str) -> str | None:
    if compose is not None and compose_hash:
        raise click.UsageError("give a compose hash or --compose FILE, not both")
    if compose is not None:
        return "0x" + hashlib.sha256(compose.read_bytes()).hexdigest()
    return _hex32(compose_hash, hint) if compose_hash else None


_compose_option = click.option(
    "--compose", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="app-compose.json: its sha256 (of the exact bytes) is the compose hash",
)  # fmt: skip


@app_contract.command("deploy")
@_chain_options
@_kms_contract_option
@click.option("--owner", default="", metavar="ADDR", help="[default: the sender]")
@click.option("--compose-hash", default="", metavar="HEX", help="first allowed compose hash")
@_compose_option
@click.option("--device-id", default="", metavar="HEX", help="first allowed device")
@click.option("--allow-any-device", is_flag=True, help="skip the device check")
@click.option("--require-tcb-up-to-date", is_flag=True, help="refuse an out-of-date TCB")
@json_option
def app_deploy(
    as_json: bool, compose: Path | None, compose_hash: str, device_id: str,
    allow_any_device: bool, require_tcb_up_to_date: bool, **o: Any,
) -> None:  # fmt: skip
    """Create an app through the KMS contract's factory (dstack's deployAndRegisterApp); prints
    its app id, the new DstackApp's address."""
    first = _compose_hash(compose, compose_hash, "--compose-hash") or "0x" + "00" * 32
    device = _hex32(device_id, "--device-id") if device_id else "0x" + "00" * 32
    kms = _kms(o)
    owner = _address(o["owner"], "--owner") if o["owner"] else kms.sender_address
    with _errors():
        app = kms.deploy_app(
            owner, compose_hash=first, device_id=device, allow_any_device=allow_any_device,
            require_tcb_up_to_date=require_tcb_up_to_date,
        )  # fmt: skip
    app_id = app.address
    _out(
        as_json,
        {"app_id": app_id[2:].lower(), "app_contract": app_id, "kms_contract": kms.address,
         "owner": owner, "compose_hash": first, "allow_any_device": allow_any_device},
        f"app {app_id[2:].lower()} (contract {app_id}, owner {owner})",
    )  # fmt: skip


def _app_argument(f: _F) -> _F:
    return click.argument("app_id", metavar="APP_ID")(f)


@app_contract.command("add-compose-hash")
@_chain_options
@_app_argument
@click.argument("compose_hash", required=False)
@_compose_option
@json_option
def app_add_compose_hash(
    as_json: bool, compose_hash: str | None, compose: Path | None, **o: Any
) -> None:
    """Allow COMPOSE_HASH (or --compose FILE's) for APP_ID (its contract address)."""
    _set_compose_hash(as_json, compose_hash, compose, o, allowed=True)


@app_contract.command("remove-compose-hash")
@_chain_options
@_app_argument
@click.argument("compose_hash", required=False)
@_compose_option
@json_option
def app_remove_compose_hash(
    as_json: bool, compose_hash: str | None, compose: Path | None, **o: Any
) -> None:
    """Stop allowing COMPOSE_HASH for APP_ID: its next boot gets a KeyDenied."""
    _set_compose_hash(as_json, compose_hash, compose, o, allowed=False)


def _set_compose_hash(
    as_json: bool, compose_hash: str | None, compose: Path | None, o: dict[str, Any], *,
    allowed: bool,
) -> None:  # fmt: skip
    value = _compose_hash(compose, compose_hash, "COMPOSE_HASH")
    if value is None:
        raise click.UsageError("give COMPOSE_HASH or --compose FILE")
    app = _app(o)
    with _errors():
        (app.add_compose_hash if allowed else app.remove_compose_hash)(value)
    what = "allowed" if allowed else "no longer allowed"
    _out(as_json, {"app_contract": app.address, "compose_hash": value, "allowed": allowed},
         f"compose hash {value} {what} for app {app.address}")  # fmt: skip


@app_contract.command("add-device")
@_chain_options
@_app_argument
@click.argument("device_id")
@json_option
def app_add_device(as_json: bool, device_id: str, **o: Any) -> None:
    """Allow APP_ID to boot on DEVICE_ID (64 hex digits)."""
    value = _hex32(device_id, "DEVICE_ID")
    app = _app(o)
    with _errors():
        app.add_device(value)
    _out(as_json, {"app_contract": app.address, "device_id": value},
         f"device {value} allowed for app {app.address}")  # fmt: skip
