"""A CVM's boot on a TD it was given, real (configfs-tsm) or simulated: the code both share.

`boot_td` reports which TEE the quotes come from (stage ``tee``), then `run_boot` (keys from
the KMS named in sys-config over RA-TLS, checked with ``td.kms_trust``, else local dev keys
kept in ``td.state_dir``; env), the gateway step (registration, wireguard-go), and the guest
agent on `sock`. The TD comes from `pydstack_guest.tee.open_td` (the QEMU image) or
`pydstack_guest.simulated.simulated_td` (the sandbox)::

    booted = await boot_td(shared, td, sock=..., report=emit, wg=wg)
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
from typing import Literal

from pydstack.adapters.tdx.backend import TdxBackend
from pydstack.adapters.wireguard import WireGuardBackend

from .boot import DataDisk, HostShared, Report
from .gateway_setup import Reach
from .kms_trust import KmsTrust

TeeKind = Literal["tdx", "simulated"]


class Booted:
    """What the boot produced: the running agent and tunnel (close them) and the env for the
    compose file (allowed_envs plus the ``DSTACK_*`` names dstack offers compose files)."""

    def __init__(self, agent: contextlib.AsyncExitStack, env: dict[str, str]) -> None:
        self.agent, self.env = agent, env


@dataclass(frozen=True)
class Td:
    """The TD a CVM boots on: where its quotes come from, whom its KMS checks trust, and what
    the agent reports about its VM."""

    kind: TeeKind
    backend: TdxBackend
    kms_trust: KmsTrust  # Intel's root on TDX; the dev PKI's only when simulated
    detail: str  # the ``tee`` boot stage after the kind: which backend, from where
    os_image_hash: bytes
    state_dir: Path  # writable: local dev keys (used only without a KMS)
    name: str
    vcpu: int
    memory_mb: int

    def describe(self) -> str:
        return f"{self.kind}: {self.detail}"


async def boot_td(
    shared: HostShared, td: Td, *, sock: Path, report: Report,
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

    from . import GuestAgent, GuestConfig, LocalKeyProvider, serve_agent
    from .boot import run_boot
    from .gateway_setup import setup_gateway
    from .provider import create_dev_app_keys
    from .runtime_log import RuntimeEventFile

    report("tee", td.describe())  # before any quote: the host learns what they are worth
    compose = shared.app_compose
    backend = td.backend
    if runtime_log is not None:
        backend = RuntimeEventFile(backend, runtime_log)
    keys_path = td.state_dir / "appkeys.json"  # local dev keys, used only without a KMS
    if not keys_path.exists():
        # for the app id measured without a KMS: the compose hash's first 20 bytes, whatever
        # app id the host names in .instance_info (boot.plan_boot, as dstack)
        app_id = hashlib.sha256(compose).digest()[:20]
        write_secret(keys_path, create_dev_app_keys(app_id, now=int(time.time()))[1])
    result = await run_boot(backend, shared, report=report, local=LocalKeyProvider(keys_path),
                            os_image_hash=td.os_image_hash, dm_crypt=dm_crypt,
                            data_disk=data_disk, kms_trust=td.kms_trust)  # fmt: skip
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
