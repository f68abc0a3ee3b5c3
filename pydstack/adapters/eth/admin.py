"""Deploy and administer DstackKms and DstackApp contracts: used by the tests and the CLI.

    artifacts = compile_contracts()
    kms = KmsAdmin.deploy(w3, artifacts, sender=owner)
    kms.add_os_image(os_image_hash)
    app = kms.deploy_app(app_owner, compose_hash=compose_hash, allow_any_device=True)
    app.remove_compose_hash(compose_hash)

The calls are dstack v0.5.11's ABI, so ``KmsAdmin(w3, address, sender)`` also administers a
DstackKms that dstack's own scripts deployed (behind its proxy), and ``AppAdmin`` its apps.

``sender`` is either an address the node signs for (a dev chain's unlocked account) or an
``eth_account`` ``LocalAccount``, whose key signs here and never leaves the process.
Every method waits for its receipt; a refused transaction raises ``TransactionReverted``
naming the contract's error (``NotOwner(0x…)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, cast

from eth_abi.abi import decode as abi_decode
from eth_account.signers.local import LocalAccount
from eth_typing import ABI, ChecksumAddress
from eth_utils.abi import function_signature_to_4byte_selector
from eth_utils.address import to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractCustomError, ContractLogicError, Web3Exception
from web3.logs import DISCARD

from .abi import APP_ABI, KMS_ABI
from .bootinfo import hex_field
from .compile import Artifact
from .errors import ChainError, TransactionReverted

__all__ = ["AppAdmin", "KmsAdmin", "Sender"]

Sender = str | LocalAccount
_ZERO32: Final = b"\0" * 32


def _b32(value: str | bytes, field: str) -> bytes:
    return hex_field(value.hex() if isinstance(value, bytes) else value, 32, field)


def _custom_error(abi: list[dict[str, Any]], data: str | bytes) -> str:
    """``Name(args)`` for a custom error's revert data, or the raw data."""
    raw = bytes(HexBytes(data))
    for item in abi:
        if item.get("type") != "error":
            continue
        types = [i["type"] for i in item.get("inputs", [])]
        if function_signature_to_4byte_selector(f"{item['name']}({','.join(types)})") == raw[:4]:
            values = abi_decode(types, raw[4:])
            shown = [
                to_checksum_address(v) if t == "address" else str(v)
                for t, v in zip(types, values, strict=True)
            ]
            return f"{item['name']}({', '.join(shown)})"
    return "0x" + raw.hex()


class _Admin:
    """Sends one contract function as a transaction from ``sender`` and waits for it."""

    def __init__(self, web3: Web3, abi: list[dict[str, Any]], address: str, sender: Sender):
        self.web3 = web3
        self.address: ChecksumAddress = to_checksum_address(address)
        self.sender = sender
        self._abi = abi
        self.contract: Contract = web3.eth.contract(address=self.address, abi=cast(ABI, abi))

    @property
    def sender_address(self) -> ChecksumAddress:
        s = self.sender
        return to_checksum_address(s if isinstance(s, str) else s.address)

    def _function(self, function: str, *args: Any) -> Any:
        """``name`` or, for an overloaded function, its full signature ``name(types)``."""
        if "(" in function:
            return self.contract.get_function_by_signature(function)(*args)
        return getattr(self.contract.functions, function)(*args)

    def call(self, function: str, *args: Any) -> Any:
        """A view, at the latest block."""
        try:
            return self._function(function, *args).call()
        except (Web3Exception, OSError) as exc:
            raise ChainError(f"eth: {function} on {self.address} failed: {exc}") from exc

    def transact(self, function: str, *args: Any) -> Mapping[str, Any]:
        """Send ``function(*args)``; the receipt once mined."""
        fn = self._function(function, *args)
        try:
            # Simulate first: a refusal then costs no gas, and every node
            # reports it as a decodable revert instead of a failed gas estimate.
            fn.call({"from": self.sender_address})
            if isinstance(self.sender, str):
                tx_hash = fn.transact({"from": self.sender_address})
            else:
                tx = fn.build_transaction(
                    {
                        "from": self.sender_address,
                        "nonce": self.web3.eth.get_transaction_count(self.sender_address),
                    }
                )
                signed = self.sender.sign_transaction(cast(Any, tx))
                tx_hash = self.web3.eth.send_raw_transaction(signed.raw_transaction)
            receipt = self.web3.eth.wait_for_transaction_receipt(tx_hash)
        except ContractCustomError as exc:
            why = _custom_error(self._abi, str(exc.data))
            raise TransactionReverted(f"eth: {function} on {self.address} reverted: {why}") from exc
        except ContractLogicError as exc:
            raise TransactionReverted(f"eth: {function} on {self.address} reverted: {exc}") from exc
        except (Web3Exception, OSError) as exc:
            raise ChainError(f"eth: {function} on {self.address} failed: {exc}") from exc
        if receipt["status"] != 1:
            raise TransactionReverted(f"eth: {function} on {self.address} reverted (status 0)")
        return cast(Mapping[str, Any], receipt)


def _deploy(web3: Web3, artifact: Artifact, sender: Sender, *args: Any) -> ChecksumAddress:
    factory = web3.eth.contract(abi=cast(ABI, artifact.abi), bytecode=HexBytes(artifact.bytecode))
    who = to_checksum_address(sender if isinstance(sender, str) else sender.address)
    try:
        if isinstance(sender, str):
            tx_hash = factory.constructor(*args).transact({"from": who})
        else:
            tx = factory.constructor(*args).build_transaction(
                {"from": who, "nonce": web3.eth.get_transaction_count(who)}
            )
            tx_hash = web3.eth.send_raw_transaction(
                sender.sign_transaction(cast(Any, tx)).raw_transaction
            )
        receipt = web3.eth.wait_for_transaction_receipt(tx_hash)
    except (Web3Exception, OSError) as exc:
        raise ChainError(f"eth: deploying {artifact.name} failed: {exc}") from exc
    address = receipt["contractAddress"]
    if receipt["status"] != 1 or address is None:
        raise TransactionReverted(f"eth: deploying {artifact.name} reverted")
    return to_checksum_address(address)


class AppAdmin(_Admin):
    """One app's DstackApp (its address is the app id): compose hashes and devices."""

    def __init__(self, web3: Web3, address: str, sender: Sender) -> None:
        super().__init__(web3, APP_ABI, address, sender)

    def as_sender(self, sender: Sender) -> AppAdmin:
        return AppAdmin(self.web3, self.address, sender)

    def owner(self) -> ChecksumAddress:
        return to_checksum_address(self.call("owner"))

    def add_compose_hash(self, compose_hash: str | bytes) -> None:
        self.transact("addComposeHash", _b32(compose_hash, "compose_hash"))

    def remove_compose_hash(self, compose_hash: str | bytes) -> None:
        self.transact("removeComposeHash", _b32(compose_hash, "compose_hash"))

    def is_compose_hash_allowed(self, compose_hash: str | bytes) -> bool:
        return bool(self.call("allowedComposeHashes", _b32(compose_hash, "compose_hash")))

    def add_device(self, device_id: str | bytes) -> None:
        self.transact("addDevice", _b32(device_id, "device_id"))

    def remove_device(self, device_id: str | bytes) -> None:
        self.transact("removeDevice", _b32(device_id, "device_id"))

    def is_device_allowed(self, device_id: str | bytes) -> bool:
        return bool(self.call("allowedDeviceIds", _b32(device_id, "device_id")))

    def set_allow_any_device(self, allow: bool) -> None:
        self.transact("setAllowAnyDevice", allow)

    def set_require_tcb_up_to_date(self, require: bool) -> None:
        self.transact("setRequireTcbUpToDate", require)

    def transfer_ownership(self, new_owner: str) -> None:
        self.transact("transferOwnership", to_checksum_address(new_owner))


class KmsAdmin(_Admin):
    """The KMS cluster's DstackKms: apps, OS images, KMS measurements and devices."""

    def __init__(self, web3: Web3, address: str, sender: Sender) -> None:
        super().__init__(web3, KMS_ABI, address, sender)

    @classmethod
    def deploy(
        cls,
        web3: Web3,
        artifacts: Mapping[str, Artifact],
        *,
        sender: Sender,
        owner: str | None = None,
    ) -> KmsAdmin:
        """Deploy a DstackApp implementation (the apps' clone template) and a DstackKms."""
        who = owner or (sender if isinstance(sender, str) else sender.address)
        implementation = _deploy(web3, artifacts["DstackApp"], sender)
        address = _deploy(
            web3, artifacts["DstackKms"], sender, to_checksum_address(who), implementation
        )
        return cls(web3, address, sender)

    def as_sender(self, sender: Sender) -> KmsAdmin:
        return KmsAdmin(self.web3, self.address, sender)

    def app(self, app_id: str, sender: Sender | None = None) -> AppAdmin:
        """The app contract ``app_id`` (registered here), administered as ``sender``."""
        address = to_checksum_address(hex_field(app_id, 20, "app_id"))
        if not self.call("registeredApps", address):
            raise ChainError(f"eth: app {address} is not registered with DstackKms {self.address}")
        return AppAdmin(self.web3, address, sender or self.sender)

    def is_app_registered(self, app_id: str) -> bool:
        return bool(
            self.call("registeredApps", to_checksum_address(hex_field(app_id, 20, "app_id")))
        )

    def deploy_app(
        self,
        app_owner: str,
        *,
        compose_hash: str | bytes = _ZERO32,
        device_id: str | bytes = _ZERO32,
        allow_any_device: bool = False,
        require_tcb_up_to_date: bool = False,
        disable_upgrades: bool = False,
    ) -> AppAdmin:
        """Create and register an app through the factory (dstack's ``deployAndRegisterApp``);
        its app id is its contract's address.

        The returned admin sends as our sender: use ``as_sender`` to act as ``app_owner``.
        """
        receipt = self.transact(
            "deployAndRegisterApp(address,bool,bool,bool,bytes32,bytes32)",
            to_checksum_address(app_owner),
            disable_upgrades,
            require_tcb_up_to_date,
            allow_any_device,
            _b32(device_id, "device_id"),
            _b32(compose_hash, "compose_hash"),
        )
        events = self.contract.events.AppDeployedViaFactory().process_receipt(
            cast(Any, receipt), errors=DISCARD
        )
        if len(events) != 1:
            raise ChainError(f"eth: deployAndRegisterApp on {self.address} logged no app")
        app_id = to_checksum_address(events[0]["args"]["arg0"])
        return AppAdmin(self.web3, app_id, self.sender)

    def register_app(self, app_id: str) -> None:
        self.transact("registerApp", to_checksum_address(hex_field(app_id, 20, "app_id")))

    def add_os_image(self, os_image_hash: str | bytes) -> None:
        self.transact("addOsImageHash", _b32(os_image_hash, "os_image_hash"))

    def remove_os_image(self, os_image_hash: str | bytes) -> None:
        self.transact("removeOsImageHash", _b32(os_image_hash, "os_image_hash"))

    def add_kms_mr(self, mr_aggregated: str | bytes) -> None:
        self.transact("addKmsAggregatedMr", _b32(mr_aggregated, "mr_aggregated"))

    def remove_kms_mr(self, mr_aggregated: str | bytes) -> None:
        self.transact("removeKmsAggregatedMr", _b32(mr_aggregated, "mr_aggregated"))

    def add_kms_device(self, device_id: str | bytes) -> None:
        self.transact("addKmsDevice", _b32(device_id, "device_id"))

    def remove_kms_device(self, device_id: str | bytes) -> None:
        self.transact("removeKmsDevice", _b32(device_id, "device_id"))

    def set_gateway_app_id(self, gateway_app_id: str) -> None:
        self.transact("setGatewayAppId", gateway_app_id)

    def gateway_app_id(self) -> str:
        return str(self.call("gatewayAppId"))

    def is_os_image_allowed(self, os_image_hash: str | bytes) -> bool:
        return bool(self.call("allowedOsImages", _b32(os_image_hash, "os_image_hash")))

    def owner(self) -> ChecksumAddress:
        return to_checksum_address(self.call("owner"))

    def transfer_ownership(self, new_owner: str) -> None:
        self.transact("transferOwnership", to_checksum_address(new_owner))
