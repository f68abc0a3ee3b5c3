"""A CVM's boot on a simulated TD, shared by the sandbox backend and the QEMU TCG guest image.

Where there is no TDX (these CI machines: sandbox CVMs, QEMU under TCG) the TD is simulated
as dstack's VMM creates a real one: MRTD of the image and MRCONFIGID =
``0x01 || sha256(app-compose.json)``; its quotes are signed with a dev PKI that the KMS of
``pydstack up`` trusts (``DATA/dev-pki``, handed to the guest by its backend). Then
`run_boot` (keys from the KMS named in sys-config over RA-TLS, else local dev keys kept in
`state_dir`; env), the gateway step (registration, wireguard-go), and the guest agent on
`sock`::

    booted = await boot_simulated(shared, SimulatedTd(pki_dir=p, state_dir=s,
                                  os_image_hash=h, ...), sock=..., report=emit, wg=wg)
    ...  # run the compose app with booted.env
    await booted.agent.aclose()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydstack.adapters.wireguard import WireGuardBackend
from pydstack.core.measure import ImageParts

from .boot import DataDisk, HostShared, Report
from .gateway_setup import Reach


class Booted:
    """What the boot produced: the running agent and tunnel (close them) and the env for the
    compose file (allowed_envs plus the ``DSTACK_*`` names dstack offers compose files)."""

    def __init__(self, agent: contextlib.AsyncExitStack, env: dict[str, str]) -> None:
        self.agent, self.env = agent, env


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


async def boot_simulated(
    shared: HostShared, td: SimulatedTd, *, sock: Path, report: Report,
    wg: WireGuardBackend | None = None, reach: Reach | None = None,
    agent_tcp: str | None = None, dm_crypt: bool | None = None,
    data_disk: DataDisk | None = None, tappd_sock: Path | None = None,
    dstack_aliases: Sequence[Path] = (), runtime_log: Path | None = None,
    socket_mode: int = 0o660,
) -> Booted:  # fmt: skip
    """Raises `pydstack_guest.boot.BootFailed` when a step fails. Without `wg` the gateway
    step is skipped (the CVM has no way to run WireGuard). With `agent_tcp` (a loopback
    ``host:port``) the agent also serves its socket API there, offered to the compose file as
    ``DSTACK_AGENT_URL`` (for apps with no Unix-socket client, e.g. busybox wget). `dm_crypt`
    and `data_disk` as in `run_boot`: the QEMU image passes both (a LUKS2 data disk), the
    sandbox neither (no device-mapper in the host kernel: measured ``plain``). The agent
    serves dstack's API at `sock` and each of `dstack_aliases`, the legacy tappd API at
    `tappd_sock`; with `runtime_log` each runtime event (boot and EmitEvent) is appended
    there as dstack's ``/run/log/dstack/runtime_events.log`` has it. `socket_mode` as in
    `serve_agent` (the sandbox keeps 0660: its sockets are on the host's filesystem)."""
    from pydstack.adapters.secretfile import write_secret
    from pydstack.adapters.tdx.backend import TdxBackend, measured_simulator
    from pydstack.adapters.tdx.identity import mr_config_id_v1
    from pydstack.adapters.tdx.pki import DevPki
    from pydstack.adapters.tdx.simulator import QuoteSimulator
    from pydstack.core.measure import VmShape

    from . import GuestAgent, GuestConfig, LocalKeyProvider, serve_agent
    from .boot import run_boot
    from .gateway_setup import setup_gateway
    from .kms_trust import KmsTrust
    from .provider import create_dev_app_keys
    from .runtime_log import RuntimeEventFile

    compose = shared.app_compose
    if (td.pki_dir / "root.der").exists():
        pki = DevPki.load(td.pki_dir)
    else:
        pki = DevPki.generate()
        pki.save(td.pki_dir)
    # Measured as a TD of this image and shape would be: the KMS recomputes the same values
    # from the image registered on the log and the shape in vm_config.
    shape = VmShape(cpu_count=td.vcpu, memory_size=td.memory_mb << 20)
    backend: TdxBackend = measured_simulator(
        QuoteSimulator(pki),
        td.image,
        shape,
        mr_config_id=mr_config_id_v1(hashlib.sha256(compose).digest()),
    )
    if runtime_log is not None:
        backend = RuntimeEventFile(backend, runtime_log)
    keys_path = td.state_dir / "appkeys.json"  # local dev keys, used only without a KMS
    if not keys_path.exists():
        info = json.loads(shared.instance_info or b"{}")
        app_id = bytes.fromhex(info.get("app_id", "")) or hashlib.sha256(compose).digest()[:20]
        write_secret(keys_path, create_dev_app_keys(app_id, now=int(time.time()))[1])
    # The KMS is attested by the same dev PKI (the host share's): RA-TLS checks run on it,
    # and the boot log says "simulated".
    result = await run_boot(backend, shared, report=report, local=LocalKeyProvider(keys_path),
                            os_image_hash=td.os_image_hash, dm_crypt=dm_crypt,
                            data_disk=data_disk, kms_trust=KmsTrust.dev(pki))  # fmt: skip
    vm_config = json.dumps({**json.loads(result.vm_config), "cpu_count": td.vcpu,
                            "memory_size": td.memory_mb * 1024 * 1024})  # fmt: skip
    agent = GuestAgent(backend, result.keys, GuestConfig(
        app_name=td.name, app_compose=compose.decode(), vm_config=vm_config))  # fmt: skip
    env = {**result.env, "DSTACK_APP_ID": result.plan.app_id.hex(),
           "DSTACK_INSTANCE_ID": result.plan.instance_id.hex()}  # fmt: skip
    stack = contextlib.AsyncExitStack()
    try:
        if wg is not None:
            # netns=None: this process already lives in the CVM's network namespace (sandbox:
            # naming it would make pyroute2 fork helpers whose signals reach this loop).
            tunnel = await setup_gateway(agent, result.plan, wg=wg, report=report, reach=reach)
            if tunnel is not None:
                stack.push_async_callback(tunnel.close)
                env["DSTACK_GATEWAY_DOMAIN"] = tunnel.registration.domain
        bound = await stack.enter_async_context(
            serve_agent(agent, dstack_sock=str(sock), tcp=agent_tcp,
                        tappd_sock=str(tappd_sock) if tappd_sock is not None else None,
                        dstack_aliases=[str(p) for p in dstack_aliases],
                        socket_mode=socket_mode))  # fmt: skip
        if bound is not None:
            env["DSTACK_AGENT_URL"] = f"http://{bound}"
    except BaseException:
        await stack.aclose()
        raise
    return Booted(stack, env)
