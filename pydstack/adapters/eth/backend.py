"""The ``eth`` authorization backend: asks a DstackKms contract (dstack's, or ours).

    backend = EthAuthBackend.connect("http://127.0.0.1:8545", kms_address)
    verdict = await backend.authorize_app(boot)

Each call reads the latest block, so an owner's policy change applies to the next request.
The contract answers (allowed, short reason); the verdict's reason names the values involved.
A chain that cannot be asked (RPC down, no contract at the address) raises ``ChainError``: an
outage, which the KMS turns into a refusal naming it. A view that reverts (dstack's DstackKms
lets an app contract's revert through) is a refusal naming the revert.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final, cast

from eth_typing import ABI
from eth_utils.address import to_checksum_address
from web3 import Web3
from web3.exceptions import ContractLogicError, Web3Exception

from pydstack.core.kms.auth import AuthVerdict, BootInfo

from .bootinfo import KMS_AUTH_VIEW_ABI, app_boot_info, hex_field
from .errors import BootInfoError, ChainError

__all__ = ["EthAuthBackend"]

# DstackKms.appImplementation(): GetMeta's app_auth_implementation (both contracts have it)
_APP_IMPLEMENTATION: Final[dict[str, Any]] = {
    "type": "function",
    "name": "appImplementation",
    "stateMutability": "view",
    "inputs": [],
    "outputs": [{"name": "", "type": "address", "internalType": "address"}],
}


def _hex(value: str, size: int) -> str:
    try:
        return "0x" + hex_field(value, size, "").hex()
    except BootInfoError:
        return value


def _explain(reason: str, boot: BootInfo, kms: bool) -> str:
    """The contract's short reason, with the BootInfo values it is about."""
    app = _hex(boot.app_id, 20)
    match reason:
        case "App not registered":
            return f"app {app} not registered"
        case "OS image is not allowed":
            return f"os image {_hex(boot.os_image_hash, 32)} not allowed"
        case "Compose hash not allowed":
            return f"compose hash {_hex(boot.compose_hash, 32)} not allowed for app {app}"
        case "Device not allowed":
            return f"device {_hex(boot.device_id, 32)} not allowed for app {app}"
        case "TCB status is not up to date":
            return f"TCB status {boot.tcb_status!r} is not up to date"
        case "Aggregated MR not allowed":
            return f"KMS aggregated MR {_hex(boot.mr_aggregated, 32)} not allowed"
        case "KMS is not allowed to boot on this device":
            return f"KMS not allowed on device {_hex(boot.device_id, 32)}"
        case "App not deployed or invalid address":
            return f"app {app} has no contract deployed"
        case "App contract call failed":
            return f"app {app}'s contract reverted"
        case "":
            return "refused without a reason"
        case _:
            return f"{reason} (kms)" if kms else f"{reason} (app {app})"


class EthAuthBackend:
    """``AuthBackend`` over a DstackKms contract, through a synchronous web3 in a worker thread.

    The provider must tolerate calls from several threads (HTTPProvider does).
    """

    name: str

    def __init__(self, web3: Web3, kms_contract_address: str, *, name: str = "eth") -> None:
        self.name = name
        self._web3 = web3
        self._address: Final = to_checksum_address(kms_contract_address)
        abi = cast(ABI, [*KMS_AUTH_VIEW_ABI, _APP_IMPLEMENTATION])
        self._contract = web3.eth.contract(address=self._address, abi=abi)

    @classmethod
    def connect(
        cls, rpc_url: str, kms_contract_address: str, *, timeout: float = 10.0
    ) -> EthAuthBackend:
        """A backend on a JSON-RPC endpoint (HTTP), each request bounded by ``timeout``."""
        provider = Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout})
        return cls(Web3(provider), kms_contract_address)

    @property
    def address(self) -> str:
        return self._address

    async def authorize_app(self, boot: BootInfo) -> AuthVerdict:
        return await asyncio.to_thread(self._ask, "isAppAllowed", boot)

    async def authorize_kms(self, boot: BootInfo) -> AuthVerdict:
        return await asyncio.to_thread(self._ask, "isKmsAllowed", boot)

    async def meta(self) -> dict[str, object]:
        """GetMeta's chain fields as dstack's auth-eth `GET /` feeds them to its KMS (the
        contract's gatewayAppId and appImplementation, the chain id); ChainError if the chain
        cannot be asked."""
        return await asyncio.to_thread(self._meta)

    def _meta(self) -> dict[str, object]:
        functions: Any = self._contract.functions
        try:
            gateway_app_id = functions.gatewayAppId().call()
            implementation = functions.appImplementation().call()
            chain_id = self._web3.eth.chain_id
        except (Web3Exception, OSError, ValueError) as exc:
            first = (str(exc).splitlines() or [""])[0][:200]
            raise ChainError(
                f"eth: reading KMS contract {self._address} failed: {type(exc).__name__}: "
                f"{first}; check the RPC endpoint and the contract address"
            ) from exc
        return {
            "gateway_app_id": str(gateway_app_id),
            "kms_contract_address": self._address,
            "chain_id": int(chain_id),
            "app_auth_implementation": str(implementation),
        }

    def _ask(self, function: str, boot: BootInfo) -> AuthVerdict:
        try:
            info = app_boot_info(boot)
        except BootInfoError as exc:
            return AuthVerdict(is_allowed=False, reason=str(exc))
        functions: Any = self._contract.functions
        try:
            allowed, reason = getattr(functions, function)(info).call()
            gateway_app_id = functions.gatewayAppId().call()
        except ContractLogicError as exc:
            why = exc.message or str(exc)
            return AuthVerdict(
                is_allowed=False, reason=f"KMS contract {self._address} reverted: {why}"
            )
        except (Web3Exception, OSError, ValueError) as exc:
            first = (str(exc).splitlines() or [""])[0][:200]
            raise ChainError(
                f"eth: {function} on KMS contract {self._address} failed: "
                f"{type(exc).__name__}: {first}; check the RPC endpoint and the contract address"
            ) from exc
        if allowed:
            return AuthVerdict(is_allowed=True, gateway_app_id=str(gateway_app_id))
        return AuthVerdict(
            is_allowed=False,
            reason=_explain(str(reason), boot, function == "isKmsAllowed"),
            gateway_app_id=str(gateway_app_id),
        )
