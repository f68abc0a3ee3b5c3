"""Where ``pydstack up`` listens, and the rule that keeps simulated attestation on loopback.

On a host without TDX every quote is signed by the dev PKI, so attestation proves nothing:
such a control plane must not serve other machines by accident (a "fleet" of them serving real
users). ``up`` therefore refuses, before it starts or appends anything, to bind any listener to
a non-loopback address while attestation is simulated, unless the operator passes
``--allow-simulated``. Pure (but ``tsm_report_present``): the caller passes the options, the
data dir's remembered listen address and the probe's answer::

    why = simulated_reason(tsm_report=tsm_report_present(), vmm_backend="", vmm_platform="auto")
    exposed = [x for x in up_listeners(opts, nats_host="10.0.0.5", embedded=True)
               if not is_loopback(x.address)]
    if why and exposed:
        raise click.ClickException(refusal(exposed, why))

``up_listeners`` mirrors where ``controlplane.ControlPlane`` binds each service (the test
``tests/cli/test_allow_simulated.py`` compares it with the sockets a real ``up`` opens). The
gateway's WireGuard port is not listed: it binds every address by nature, and admits only
peers that RegisterCvm (on the gateway's listen address) added.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydstack.controlplane import UpOptions

TSM_REPORT: Final = "/sys/kernel/config/tsm/report"  # configfs-tsm: TDX quotes in this kernel
_WILDCARDS: Final = ("", "0.0.0.0", "::")


@dataclass(frozen=True, slots=True)
class Listener:
    option: str  # what sets the address, as the operator types it ("--listen")
    serves: str  # what listens there ("NATS client port")
    address: str  # "" (as aiohttp takes it): every address


def is_loopback(address: str) -> bool:
    """Only 127.0.0.0/8, ::1 (also IPv4-mapped) and the name ``localhost``; any other name
    counts as exposed (it may resolve anywhere), and so do the wildcards."""
    text = address.strip("[]")
    if text == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def up_listeners(o: UpOptions, *, nats_host: str, embedded: bool) -> list[Listener]:
    """Every TCP listener this ``up`` would start that clients of other machines could reach
    if its address allowed (metrics and admin endpoints are on 127.0.0.1 by construction).

    ``nats_host``: the NATS listen address in effect (``--listen``, else the data dir's
    config.json); ``embedded``: whether ``up`` runs its own nats-server (not joining one)."""
    out: list[Listener] = []
    if embedded:
        out.append(Listener("--listen", "NATS client port", nats_host))
    kms = bool(o.kms) or (o.kms is None and embedded)
    if kms:  # controlplane._kms_launch: a wildcard --listen puts the KMS on 127.0.0.1
        out.append(Listener("--listen", "KMS", o.host if o.host not in (None, *_WILDCARDS)
                            else "127.0.0.1"))  # fmt: skip
    if o.gateway or (o.gateway is None and kms):
        option = "--gateway-listen" if o.gateway_listen else "--listen"
        out.append(Listener(option, "gateway HTTPS and RegisterCvm", o.gateway_listen or nats_host))
    if o.dashboard_port >= 0:
        out.append(Listener("--dashboard-listen", "dashboard", o.dashboard_listen))
    if o.vmm_backend and o.host_id:
        if o.vmm_api_port >= 0:
            out.append(Listener("--listen", "VMM API (--vmm-api-port)", o.host or "127.0.0.1"))
        if o.allow_public_ports:  # CVM ports forwarded from any host address: apps' clients
            out.append(Listener("--allow-public-ports", "CVM port forwards", "0.0.0.0"))
    return out


def simulated_reason(*, tsm_report: bool, vmm_backend: str, vmm_platform: str) -> str:
    """Why attestation is simulated here ("" when it is not): the KMS and the gateway trust
    the dev PKI without configfs-tsm (as ``controlplane`` decides), and sandbox, tcg and kvm
    CVMs simulate their TD."""
    if not tsm_report:
        return f"no TDX on this host: {TSM_REPORT} is missing"
    if vmm_backend == "sandbox":
        return "--vmm sandbox CVMs simulate their TD"
    if vmm_backend == "qemu" and vmm_platform in ("kvm", "tcg"):
        return f"--platform {vmm_platform} CVMs simulate their TD"
    return ""


def refusal(exposed: Sequence[Listener], reason: str) -> str:
    """The one-line error naming each exposed listener and the option that allows it."""
    where: dict[tuple[str, str], list[str]] = {}
    for x in exposed:
        where.setdefault((x.option, x.address or "0.0.0.0"), []).append(x.serves)
    names = "; ".join(f"{opt} {addr} ({', '.join(what)})" for (opt, addr), what in where.items())
    return (f"attestation is SIMULATED ({reason}), so up serves loopback clients only; not "
            f"loopback: {names}; listen on 127.0.0.1, or pass --allow-simulated to serve other "
            "machines anyway (development only: attestation proves nothing to them)")  # fmt: skip


def tsm_report_present() -> bool:
    return Path(TSM_REPORT).exists()
