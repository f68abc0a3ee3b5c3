"""The ``eth`` authorization backend: on-chain allow-lists in our KmsAuth/AppAuth contracts.

    backend = EthAuthBackend.connect(rpc_url, kms_address)
    verdict = await backend.authorize_app(boot)

``contracts/`` (repo root) holds the Solidity; ``compile_contracts`` builds it with solc or
solcjs, and ``KmsAdmin``/``AppAdmin`` deploy and change the policy (tests, CLI).
"""

from .admin import AppAdmin, KmsAdmin, Sender
from .backend import EthAuthBackend
from .bootinfo import KMS_AUTH_VIEW_ABI, app_boot_info
from .compile import Artifact, SolcCommand, compile_contracts, contracts_dir, find_solc
from .errors import BootInfoError, ChainError, CompileError, EthError, TransactionReverted

__all__ = [
    "KMS_AUTH_VIEW_ABI",
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
    "find_solc",
]
