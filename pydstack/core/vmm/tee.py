"""Which TEE a host's CVMs quote with, from the platform they run on (``VmStarted.tee``).

Only TDX is a TEE. Every other platform (QEMU ``tcg`` / ``kvm``, the ``sandbox`` backend)
runs a guest that simulates its TD: its quotes are signed by the dev PKI and prove nothing.

>>> tee_of_platform("tdx"), tee_of_platform("tcg"), tee_of_platform("")
('tdx', 'simulated', '')
"""

from __future__ import annotations

from typing import Final

TDX: Final = "tdx"
SIMULATED: Final = "simulated"


def tee_of_platform(platform: str) -> str:
    """ "tdx" for TDX, "simulated" for any other known platform, "" when it is not known."""
    if not platform:
        return ""
    return TDX if platform == "tdx" else SIMULATED
