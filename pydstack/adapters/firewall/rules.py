"""What a CVM may reach on its own host: one allow list, and the nftables rules for it. Pure.

With QEMU user networking (slirp) a guest's connections to the host leave from the QEMU
process: 10.0.2.2 is the host's loopback, and every other address of the host is reached as
it is. QEMU therefore runs as its own user, and these rules, in the output hook, decide what
that user may open on *any address of this host* (``fib daddr type local``: loopback and every
interface's addresses; broadcast and multicast with them): the ports of ``HostServices`` and
nothing else. Traffic to other machines (the app's egress) is not this table's business, and
replies on connections made *to* QEMU (its ``hostfwd`` port maps) pass as established.

``restrict=on`` is no answer: it also cuts the guest's WireGuard tunnel and all egress.

Usage::

    text = ruleset(uid, HostServices(kms=(9100,), gateway_registration=(8011,), wireguard=(51820,)))
    # nft -f - < text   (adapters.firewall.nft does it)
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final, Literal
from urllib.parse import urlsplit

import msgspec

Protocol = Literal["tcp", "udp"]
TABLE: Final = "pydstack_guest_egress"


class HostServices(msgspec.Struct, frozen=True, kw_only=True):
    """The host services a guest needs, by port. Every other port of every address of this host
    is closed to it. A new service is a field here and a row in ``PROTOCOLS``."""

    kms: tuple[int, ...] = ()  # key provisioning (GetAppKey over RA-TLS), every local replica
    gateway_registration: tuple[int, ...] = ()  # the gateway's RegisterCvm (TLS)
    wireguard: tuple[int, ...] = ()  # the gateway's tunnel endpoint
    registry: tuple[int, ...] = ()  # image registries / mirrors (`up --registry`)
    dns: tuple[int, ...] = ()  # a resolver on this host (slirp's 10.0.2.3 relays to it)


# The one place that says which protocol opens which service's ports.
PROTOCOLS: Final[dict[str, tuple[Protocol, ...]]] = {
    "kms": ("tcp",),
    "gateway_registration": ("tcp",),
    "wireguard": ("udp",),
    "registry": ("tcp",),
    "dns": ("udp", "tcp"),
}


class RulesError(ValueError):
    """The allow list cannot become rules; the message names the field."""


def allowed(services: HostServices) -> dict[Protocol, tuple[int, ...]]:
    """Open ports by protocol, sorted and each once."""
    out: dict[Protocol, set[int]] = {"tcp": set(), "udp": set()}
    for name, protocols in PROTOCOLS.items():
        ports: tuple[int, ...] = getattr(services, name)
        for port in ports:
            if not (isinstance(port, int) and 0 < port < 65536):
                raise RulesError(f"{name}: port {port!r} outside 1..65535")
            for proto in protocols:
                out[proto].add(port)
    return {proto: tuple(sorted(ports)) for proto, ports in out.items()}


def ruleset(uid: int, services: HostServices) -> str:
    """The ``nft -f`` text that (re)places the table for QEMU's ``uid``, in one transaction
    (``nft`` applies a file atomically): ``… jump guest`` for that uid, and in ``guest``:
    ``tcp dport { 9100 } accept`` for ``HostServices(kms=(9100,))``, the rest rejected."""
    if not (isinstance(uid, int) and uid > 0):
        raise RulesError(f"uid {uid!r}: QEMU's own user, never root")
    rules = [
        "ct state established,related accept",  # replies: hostfwd port maps, allowed flows
        "fib daddr type != { local, broadcast, multicast } accept",  # another machine
    ]
    for proto, ports in allowed(services).items():
        if ports:
            rules.append(f"{proto} dport {{ {', '.join(map(str, ports))} }} accept")
    # reject, not drop: the guest's connect fails at once instead of timing out
    rules.append("counter reject with icmpx type admin-prohibited")
    body = "".join(f"\t\t{r}\n" for r in rules)
    return (
        f"{_replace_prefix()}"
        f"table inet {TABLE} {{\n"
        "\tchain output {\n"
        "\t\ttype filter hook output priority filter; policy accept;\n"
        f"\t\tmeta skuid {uid} jump guest\n"
        "\t}\n"
        "\tchain guest {\n"
        f"{body}"
        "\t}\n"
        "}\n"
    )


def removal() -> str:
    """The ``nft -f`` text that removes the table (and succeeds when there is none)."""
    return _replace_prefix()


def _replace_prefix() -> str:
    # Declaring the table first makes the delete succeed when it does not exist yet.
    return f"table inet {TABLE}\ndelete table inet {TABLE}\n"


# -- the gateway's tunnel: nothing forwarded into or out of it --------------------------------

_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")  # what Linux takes, minus what nft would parse


def forward_table(ifname: str) -> str:
    """The table name of a gateway interface's forwarding guard."""
    if not _IFNAME.match(ifname):
        raise RulesError(f"interface name {ifname!r}: want 1-15 of [A-Za-z0-9_.-]")
    return "pydstack_gw_" + re.sub(r"[.-]", "_", ifname)


def forward_guard(ifname: str) -> str:
    """The ``nft -f`` text that (re)places the guard of a gateway's WireGuard interface.

    Every CVM is a peer of the gateway's interface; with ``ip_forward`` on (docker turns it
    on, so do routers) the kernel forwards what a CVM sends to another CVM's tunnel address,
    or to anything the gateway's namespace reaches, and back. The gateway never needs that:
    its proxy terminates every connection it makes to a CVM (output, not forward). So the
    forward hook drops whatever arrives on, or would leave by, that interface.
    (``sysctl net.ipv4.conf.<if>.forwarding=0`` is no answer: writing ``ip_forward=1``, as
    docker does, sets every interface's back to 1.)"""
    table = forward_table(ifname)
    return (
        f"table inet {table}\ndelete table inet {table}\n"
        f"table inet {table} {{\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        f'\t\tiifname "{ifname}" counter drop\n'  # CVM to CVM, CVM to the gateway's networks
        f'\t\toifname "{ifname}" counter drop\n'  # anything routed into the tunnel
        "\t}\n"
        "}\n"
    )


def forward_guard_removal(ifname: str) -> str:
    table = forward_table(ifname)
    return f"table inet {table}\ndelete table inet {table}\n"


def url_ports(urls: tuple[str, ...] | list[str]) -> tuple[int, ...]:
    """The ports of service URLs (scheme defaults: https 443, http 80), each once."""
    out: list[int] = []
    for url in urls:
        parts = urlsplit(url if "//" in url else f"//{url}")
        try:
            port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
        except ValueError:
            raise RulesError(f"{url!r}: not a host:port URL") from None
        if port is not None and port not in out:
            out.append(port)
    return tuple(out)


def resolver_ports(resolv_conf: str) -> tuple[int, ...]:
    """(53,) when resolv.conf names a loopback resolver (systemd-resolved's 127.0.0.53,
    dnsmasq): slirp relays the guest's DNS to it from QEMU, so its port must stay open."""
    for line in resolv_conf.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                if ipaddress.ip_address(words[1].split("%")[0]).is_loopback:
                    return (53,)
            except ValueError:
                continue
    return ()
