"""The sandbox CVM's boot: `pydstack_guest.simulated.boot_simulated` (the code the QEMU guest
image runs too) with what is particular to the sandbox.

The simulated TD's quotes are signed with the dev PKI the KMS of ``pydstack up`` trusts
(``SandboxRun.dev_pki``, else one generated in the work dir); its image hash names the sandbox
image. The gateway step registers over the relayed URL and runs wireguard-go inside the CVM's
namespace (its UAPI socket under the short run dir), each gateway's WireGuard endpoint relayed
over UDP. The agent also serves its socket API on ``AGENT_TCP``, the loopback of the CVM's own
namespace, reachable by `network_mode: host` services only (a bridge network has its own
loopback): no wider than the socket.

No encrypted data disk: the sandbox runs on the host's kernel, which has no device-mapper
(dm-crypt), so the boot measures ``storage-fs`` = ``plain`` and its ``storage`` stage says the
data disk is NOT encrypted (the QEMU guest has LUKS2: `pydstack_guest.data_disk`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from pydstack.adapters.cvm import CvmSpec
from pydstack_guest.simulated import Booted

__all__ = ["AGENT_TCP", "Booted", "Network", "boot"]

AGENT_TCP = "127.0.0.1:8090"  # dstack's agent port (there on every interface, a public API)


class Network:
    """How the CVM reaches the world: a short dir for sockets (wireguard-go's UAPI) and the
    UDP relay to the gateways' WireGuard endpoints."""

    def __init__(self, run_dir: Path, udp: Callable[[str], Awaitable[str]]) -> None:
        self.run_dir, self.udp = run_dir, udp


async def boot(
    wd: Path, dev_pki: str, spec: CvmSpec, sock: Path, report: Callable[[str, str], None],
    net: Network | None = None, *, images: Path,
) -> Booted:  # fmt: skip
    """Raises `pydstack_guest.boot.BootFailed` when a step fails. `images`: the sandbox images'
    root, where ``spec.image`` is measured from (as `pydstack image register` does)."""
    from pydstack.adapters.wireguard import UserspaceBackend
    from pydstack.core.measure import ImageParts
    from pydstack_guest.boot import BootFailed, read_host_shared
    from pydstack_guest.simulated import SimulatedTd, boot_simulated

    from .images import image_registration

    compose = spec.app_compose or b'{"name":"sandbox"}'
    shared = read_host_shared(wd / "shared", app_compose=compose)
    try:
        reg = image_registration(images, spec.image)
    except (OSError, ValueError) as e:
        raise BootFailed("image", f"image {spec.image!r} cannot be measured: {e}") from None
    td = SimulatedTd(
        pki_dir=Path(dev_pki) if dev_pki else wd / "sim" / "pki", state_dir=wd / "sim",
        os_image_hash=bytes.fromhex(reg.os_image_hash),
        image=ImageParts(firmware=reg.firmware, kernel=reg.kernel, initrd=reg.initrd,
                         cmdline=reg.cmdline),
        name=spec.name, vcpu=spec.vcpu, memory_mb=spec.memory_mb,
    )  # fmt: skip
    # dstack's other socket paths and its runtime event log, under the CVM's own dirs (the
    # sandbox shares the host's filesystem); containers get the sockets at dstack's paths.
    return await boot_simulated(
        shared, td, sock=sock, report=report,
        wg=UserspaceBackend(net.run_dir / "wg") if net is not None else None,
        reach=net.udp if net is not None else None, agent_tcp=AGENT_TCP,
        tappd_sock=sock.parent / "tappd.sock",
        dstack_aliases=[sock.parent / "dstack" / "dstack.sock"],
        runtime_log=wd / "run" / "log" / "dstack" / "runtime_events.log",
    )  # fmt: skip
