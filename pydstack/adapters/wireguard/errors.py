"""Typed errors of the WireGuard adapter: callers catch `WireGuardError`, never driver errors."""

from __future__ import annotations

import os


class WireGuardError(Exception):
    """Base of every error raised by `pydstack.adapters.wireguard`."""


class KeyFormatError(WireGuardError, ValueError):
    """A key is not 32 bytes of base64 / hex; the message shows what was given."""


class UapiProtocolError(WireGuardError):
    """The UAPI socket answered something that is not the documented key=value protocol."""


class UapiError(WireGuardError):
    """The device refused a UAPI operation with a non-zero ``errno``."""

    def __init__(self, errno: int, operation: str) -> None:
        self.errno = errno
        self.operation = operation
        reason = os.strerror(errno) if errno > 0 else "unknown error"
        super().__init__(
            f"wireguard {operation} failed: errno={errno} ({reason}); check keys, "
            "endpoints and allowed IPs in the request"
        )


class BackendUnavailable(WireGuardError):
    """This backend cannot run on this host (no kernel module, no wireguard-go binary, ...)."""


class DeviceError(WireGuardError):
    """Creating, configuring or stopping a device failed (process died, netlink refused)."""


class NetnsError(WireGuardError):
    """A network-namespace, link, address or route operation failed."""
