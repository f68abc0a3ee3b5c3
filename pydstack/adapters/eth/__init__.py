"""The ``eth`` authorization backend: on-chain allow-lists in dstack's DstackKms/DstackApp ABI.

    backend = EthAuthBackend.connect(rpc_url, kms_address)
    verdict = await backend.authorize_app(boot)

``contracts/`` (repo root) holds our Solidity, ABI-compatible with dstack v0.5.11's
contracts (an app id is its DstackApp's address); ``compile_contracts`` builds it with solc or
solcjs, ``KmsAdmin``/``AppAdmin`` deploy and change the policy (tests, CLI) on ours or on
dstack's, and ``Anvil`` runs a local node.
"""

from .abi import APP_ABI, KMS_ABI
from .admin import AppAdmin, KmsAdmin, Sender
from .anvil import Anvil, find_anvil
from .backend import EthAuthBackend
from .bootinfo import KMS_AUTH_VIEW_ABI, app_boot_info
from .compile import Artifact, SolcCommand, compile_contracts, contracts_dir, find_solc
from .errors import BootInfoError, ChainError, CompileError, EthError, TransactionReverted

__all__ = [
    "APP_ABI",
    "KMS_ABI",
    "KMS_AUTH_VIEW_ABI",
    "Anvil",
    "AppAdmin",
    "Artifact",
    "BootInfoError",
    "ChainError",
    "CompileError",
    "EthAuthBackend",
    "EthError",
    "KmsAdmin",
    "Sender",
    "SolcCommand",
    "TransactionReverted",
    "app_boot_info",
    "compile_contracts",
    "contracts_dir",
    "find_anvil",
    "find_solc",
]
