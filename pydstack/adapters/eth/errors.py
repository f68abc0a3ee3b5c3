"""Errors of the eth adapter: one line each, saying what is wrong and what to do."""

from __future__ import annotations


class EthError(Exception):
    """Base of every error this adapter raises."""


class BootInfoError(EthError, ValueError):
    """A BootInfo field cannot be encoded as the contract's AppBootInfo (bad hex or too long)."""


class CompileError(EthError):
    """solc is missing or rejected the contracts."""


class ChainError(EthError):
    """The chain could not be asked: RPC down, wrong address, no contract there."""


class TransactionReverted(EthError):
    """An admin transaction was refused by the contract (e.g. ``NotOwner(0x…)``)."""
