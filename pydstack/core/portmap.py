"""Port maps: which host address and port a CVM port is forwarded from, checked in one place.

A ``host_address`` ends up inside QEMU's ``-netdev user,...,hostfwd=`` option and in a
``bind()``; it comes from requesters and from the log, neither of which the host trusts. So
it is accepted only as a canonical IP literal (``127.0.0.1``, ``::1``; no names, no zone ids,
no leading zeros, nothing QEMU's option parser could read as another option), and an address
that is not loopback only where the host's operator allowed public ports. Every entry (CLI,
VMM API, dashboard, scheduler, the VMM's act path) and the argv builder call
:func:`port_map_error`::

    port_map_error(PortMap(host_address="0.0.0.0", host_port=8080, vm_port=80),
                   public_allowed=False)   # -> "host address 0.0.0.0 is not loopback; ..."
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from pydstack.core.events import PortMap

PROTOCOLS: Final = ("tcp", "udp")
_SPEC: Final = re.compile(
    r"^(?:(?P<proto>tcp|udp):)?(?:(?P<addr>\[[^\]]*\]|[^:\[\]]*):)?(?P<host>\d{1,5}):(?P<vm>\d{1,5})$",
    re.IGNORECASE,
)


class PortMapError(ValueError):
    """A port map that must not be used; the message is one line naming what is wrong."""


def address_error(address: str) -> str | None:
    """None when ``address`` is a canonical IPv4 or IPv6 literal, else why not."""
    shown = ascii(address) if len(address) <= 64 else ascii(address[:64]) + "..."
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"host address {shown} is not an IP address (e.g. 127.0.0.1 or ::1)"
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        return f"host address {shown}: no IPv6 zone ids"
    if str(ip) != address:
        return f"host address {shown}: write it as {ip}"
    return None


def is_loopback(address: str) -> bool:
    """``address`` (a checked literal) reaches only this host: 127.0.0.0/8, ::1 or the
    IPv4-mapped form of a 127 address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def port_map_error(p: PortMap, *, public_allowed: bool) -> str | None:
    """None when ``p`` may be forwarded on a host that does (not) allow public ports."""
    if p.protocol not in PROTOCOLS:
        return f"port protocol {p.protocol!a}: use tcp or udp"
    if not (0 < p.host_port < 65536 and 0 < p.vm_port < 65536):
        return f"ports {p.host_port}->{p.vm_port}: both must be 1-65535"
    bad = address_error(p.host_address)
    if bad:
        return bad
    if not public_allowed and not is_loopback(p.host_address):
        return (
            f"host address {p.host_address} is not loopback; this host forwards only "
            "loopback ports (its operator allows others with `up --allow-public-ports`)"
        )
    return None


def check_port_map(p: PortMap, *, public_allowed: bool) -> PortMap:
    """``p`` itself, or :class:`PortMapError`."""
    bad = port_map_error(p, public_allowed=public_allowed)
    if bad:
        raise PortMapError(bad)
    return p


def parse_port_map(value: str) -> PortMap:
    """``[tcp|udp:][ADDR:]HOST_PORT:VM_PORT`` (dstack's ``--port tcp:0.0.0.0:8080:80``; an IPv6
    address in brackets: ``tcp:[::1]:8080:80``). Only the syntax is checked here; whether the
    host forwards that address is :func:`port_map_error`'s business."""
    m = _SPEC.match(value.strip())
    if m is None or not all(0 < int(m[g]) < 65536 for g in ("host", "vm")):
        raise PortMapError(
            f"{value!a}: expected [tcp|udp:][ADDR:]HOST_PORT:VM_PORT, ports 1-65535 "
            "(e.g. 8080:80 or tcp:127.0.0.1:8443:443)"
        )
    addr = (m["addr"] or "127.0.0.1").removeprefix("[").removesuffix("]")
    bad = address_error(addr)
    if bad:
        raise PortMapError(bad)
    return PortMap(protocol=(m["proto"] or "tcp").lower(), host_address=addr,
                   host_port=int(m["host"]), vm_port=int(m["vm"]))  # fmt: skip
