"""Host firewall for CVMs (nftables): what a QEMU guest may reach on this host, and that a
gateway forwards nothing between CVMs."""

from .nft import FirewallError, ForwardGuard, GuestEgress, processes_of, unavailable_reason
from .rules import (
    PROTOCOLS,
    TABLE,
    HostServices,
    RulesError,
    allowed,
    forward_guard,
    forward_table,
    removal,
    resolver_ports,
    ruleset,
    url_ports,
)

__all__ = [
    "PROTOCOLS", "TABLE", "FirewallError", "ForwardGuard", "GuestEgress", "HostServices",
    "RulesError", "allowed", "forward_guard", "forward_table", "processes_of", "removal",
    "resolver_ports", "ruleset", "unavailable_reason", "url_ports",
]  # fmt: skip
