"""Host firewall for CVMs: what a QEMU guest may reach on this host (nftables)."""

from .nft import FirewallError, GuestEgress, processes_of, unavailable_reason
from .rules import (
    PROTOCOLS,
    TABLE,
    HostServices,
    RulesError,
    allowed,
    removal,
    resolver_ports,
    ruleset,
    url_ports,
)

__all__ = [
    "PROTOCOLS", "TABLE", "FirewallError", "GuestEgress", "HostServices", "RulesError",
    "allowed", "processes_of", "removal", "resolver_ports", "ruleset", "unavailable_reason",
    "url_ports",
]  # fmt: skip
