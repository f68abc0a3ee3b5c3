"""WireGuard adapter: keys, the UAPI protocol, peer diffs, and two backends behind one port.

Usage::

    from pydstack.adapters.wireguard import (
        DeviceConfig, PeerConfig, PrivateKey, UserspaceBackend, KernelBackend,
    )
    backend = UserspaceBackend(run_dir=Path("/run/pydstack/wg"))
    # or the host's choice: the kernel's WireGuard where it works, else wireguard-go
    backend, choice = await pick_backend("auto", run_dir=Path("/run/pydstack/wg"))
    async with await backend.create("wg0", netns="gw1") as dev:
        await dev.configure(DeviceConfig(private_key=PrivateKey.generate(), listen_port=51820))
        await dev.sync_peers([PeerConfig(public_key=pk, allowed_ips=("10.4.0.2/32",))])
"""

from .choice import WANTED, BackendChoice, choose_backend, pick_backend
from .device import WireGuardBackend, WireGuardDevice
from .diff import apply_ops, diff_device, diff_peers
from .errors import (
    BackendUnavailable,
    DeviceError,
    KeyFormatError,
    NetnsError,
    UapiError,
    UapiProtocolError,
    WireGuardError,
)
from .kernel import KernelBackend, KernelDevice
from .keys import PrivateKey, PublicKey, b64_to_hex, hex_to_b64
from .model import DeviceConfig, DeviceStatus, PeerConfig, PeerOp, PeerStatus
from .uapi import check_set_response, parse_get, render_set
from .userspace import UserspaceBackend, UserspaceDevice, uapi_request

__all__ = [
    "WANTED",
    "BackendChoice",
    "BackendUnavailable",
    "DeviceConfig",
    "DeviceError",
    "DeviceStatus",
    "KernelBackend",
    "KernelDevice",
    "KeyFormatError",
    "NetnsError",
    "PeerConfig",
    "PeerOp",
    "PeerStatus",
    "PrivateKey",
    "PublicKey",
    "UapiError",
    "UapiProtocolError",
    "UserspaceBackend",
    "UserspaceDevice",
    "WireGuardBackend",
    "WireGuardDevice",
    "WireGuardError",
    "apply_ops",
    "b64_to_hex",
    "check_set_response",
    "choose_backend",
    "diff_device",
    "diff_peers",
    "hex_to_b64",
    "parse_get",
    "pick_backend",
    "render_set",
    "uapi_request",
]
