"""Typed errors of the TDX adapter: callers catch `TdxError`, never driver exceptions."""

from __future__ import annotations


class TdxError(Exception):
    """Base of every error raised by `pydstack.adapters.tdx`."""


class QuoteParseError(TdxError):
    """The bytes are not a well-formed TDX quote; the message names the field and offset."""


class CollateralError(TdxError):
    """Collateral could not be loaded or fetched (bad JSON, unreachable PCCS, ...)."""


class BackendError(TdxError):
    """A quote or RTMR operation failed in a backend (configfs, sysfs, simulator)."""
