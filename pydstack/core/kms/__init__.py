"""Pure KMS logic: authorization types, dstack-compatible key derivation, decisions, audit."""

from .auth import AuthBackend, AuthVerdict, BootInfo

__all__ = ["AuthBackend", "AuthVerdict", "BootInfo"]
