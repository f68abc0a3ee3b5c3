"""A simulated TD, for CVMs on a platform with no TEE: the sandbox and QEMU under TCG or KVM.

Where there is no TDX the TD is simulated as dstack's VMM creates a real one: MRTD of the
image and MRCONFIGID = ``0x01 || sha256(app-compose.json)``; its quotes are signed with a dev
PKI that the KMS of ``pydstack up`` trusts (``DATA/dev-pki``, handed to the guest by its
backend), and the CVM trusts a KMS attested by that PKI only. The boot itself is
`pydstack_guest.td_boot.boot_td`'s, which reports the TD as ``simulated`` (stage ``tee``)::

    booted = await boot_simulated(shared, SimulatedTd(pki_dir=p, state_dir=s,
                                  os_image_hash=h, ...), sock=..., report=emit, wg=wg)
    ...  # run the compose app with booted.env
    await booted.agent.aclose()

Only `pydstack_guest.tee.open_td` decides, in the QEMU image, that a TD is simulated: never
on a guest that has configfs-tsm, never on a VM whose platform is TDX.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydstack.core.measure import ImageParts

from .boot import HostShared
from .td_boot import Booted, Td, boot_td

__all__ = ["NO_TEE", "Booted", "SimulatedTd", "boot_simulated", "simulated_td"]

NO_TEE = "quotes signed by a dev PKI the host holds: no confidentiality"


@dataclass(frozen=True)
class SimulatedTd:
    """The simulated TD and what the agent reports about its VM."""

    pki_dir: Path  # dev PKI (root.der ...); generated there when missing and writable
    state_dir: Path  # writable: local dev keys (used only without a KMS)
    os_image_hash: bytes
    image: ImageParts  # what the TD is measured from (the image registered on the log)
    name: str
    vcpu: int
    memory_mb: int


def simulated_td(shared: HostShared, td: SimulatedTd, why: str = "no TDX here") -> Td:
    """The `Td` of `td`: the simulator measured as a TD of its image and shape would be (the
    KMS recomputes the same values from the image registered on the log and the shape in
    vm_config), trusting only KMSes attested by the same dev PKI. `why`: why simulated."""
    from pydstack.adapters.tdx.backend import measured_simulator
    from pydstack.adapters.tdx.identity import mr_config_id_v1
    from pydstack.adapters.tdx.pki import DevPki
    from pydstack.adapters.tdx.simulator import QuoteSimulator
    from pydstack.core.measure import VmShape

    from .kms_trust import KmsTrust

    if (td.pki_dir / "root.der").exists():
        pki = DevPki.load(td.pki_dir)
    else:
        pki = DevPki.generate()
        pki.save(td.pki_dir)
    shape = VmShape(cpu_count=td.vcpu, memory_size=td.memory_mb << 20)
    backend = measured_simulator(
        QuoteSimulator(pki),
        td.image,
        shape,
        mr_config_id=mr_config_id_v1(hashlib.sha256(shared.app_compose).digest()),
    )
    return Td(kind="simulated", backend=backend, kms_trust=KmsTrust.dev(pki),
              detail=f"{why}; {NO_TEE}", os_image_hash=td.os_image_hash,
              state_dir=td.state_dir, name=td.name, vcpu=td.vcpu,
              memory_mb=td.memory_mb)  # fmt: skip


async def boot_simulated(
    shared: HostShared, td: SimulatedTd, *, why: str = "no TDX here", **kw: Any
) -> Booted:
    """`boot_td` on the simulated TD of `td`; keywords as `boot_td`'s."""
    return await boot_td(shared, simulated_td(shared, td, why), **kw)
