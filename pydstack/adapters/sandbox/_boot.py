"""The sandbox CVM's boot: a simulated TD, then pydstack_guest.boot, then the guest agent.

The simulated TD is created as dstack's VMM creates a real one: MRTD of the image and
MRCONFIGID = ``0x01 || sha256(app-compose.json)``; its quotes are signed with the dev PKI the
KMS of ``pydstack up`` trusts (``SandboxRun.dev_pki``). The keys come from the KMS named in
``sys-config.json`` (``kms_urls``), else from local dev keys kept in the work dir. Then the
gateway step: registration over the relayed URL, wireguard-go inside the CVM's namespace (its
UAPI socket under the short run dir), each gateway's WireGuard endpoint relayed over UDP.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from pydstack.adapters.cvm import CvmSpec


class Booted:
    """What the boot produced: the running agent and tunnel (close them) and the env for the
    compose file (allowed_envs plus the ``DSTACK_*`` names dstack offers compose files)."""

    def __init__(self, agent: contextlib.AsyncExitStack, env: dict[str, str]) -> None:
        self.agent, self.env = agent, env


class Network:
    """How the CVM reaches the world: a short dir for sockets (wireguard-go's UAPI) and the
    UDP relay to the gateways' WireGuard endpoints."""

    def __init__(self, run_dir: Path, udp: Callable[[str], Awaitable[str]]) -> None:
        self.run_dir, self.udp = run_dir, udp


async def boot(
    wd: Path, dev_pki: str, spec: CvmSpec, sock: Path, report: Callable[[str, str], None],
    net: Network | None = None,
) -> Booted:  # fmt: skip
    """Raises `pydstack_guest.boot.BootFailed` when a step fails."""
    from pydstack.adapters.tdx.backend import SimulatorBackend
    from pydstack.adapters.tdx.identity import mr_config_id_v1
    from pydstack.adapters.tdx.pki import DevPki
    from pydstack.adapters.tdx.simulator import QuoteSimulator, TdMeasurements
    from pydstack.adapters.wireguard import UserspaceBackend
    from pydstack_guest import GuestAgent, GuestConfig, LocalKeyProvider, serve_agent
    from pydstack_guest.boot import read_host_shared, run_boot
    from pydstack_guest.gateway_setup import setup_gateway
    from pydstack_guest.provider import create_dev_app_keys

    compose = spec.app_compose or b'{"name":"sandbox"}'
    shared = read_host_shared(wd / "shared", app_compose=compose)
    pki_dir = Path(dev_pki) if dev_pki else wd / "sim" / "pki"
    pki = DevPki.load(pki_dir) if (pki_dir / "root.der").exists() else DevPki.generate()
    if not (pki_dir / "root.der").exists():
        pki.save(pki_dir)
    image_hash = hashlib.sha256(f"pydstack sandbox image {spec.image}".encode()).digest()
    backend = SimulatorBackend(QuoteSimulator(pki), TdMeasurements(
        mr_td=hashlib.sha384(b"pydstack sandbox TD").digest(),
        mr_config_id=mr_config_id_v1(hashlib.sha256(compose).digest()),
    ))  # fmt: skip
    keys_path = wd / "sim" / "appkeys.json"  # local dev keys, used only without a KMS
    if not keys_path.exists():
        info = json.loads(shared.instance_info or b"{}")
        app_id = bytes.fromhex(info.get("app_id", "")) or hashlib.sha256(compose).digest()[:20]
        keys_path.parent.mkdir(parents=True, exist_ok=True)
        keys_path.write_text(create_dev_app_keys(app_id, now=int(time.time()))[1])
    result = await run_boot(backend, shared, report=report, local=LocalKeyProvider(keys_path),
                            os_image_hash=image_hash)  # fmt: skip
    vm_config = json.dumps({**json.loads(result.vm_config), "cpu_count": spec.vcpu,
                            "memory_size": spec.memory_mb * 1024 * 1024})  # fmt: skip
    agent = GuestAgent(backend, result.keys, GuestConfig(
        app_name=spec.name, app_compose=compose.decode(), vm_config=vm_config))  # fmt: skip
    env = {**result.env, "DSTACK_APP_ID": result.plan.app_id.hex(),
           "DSTACK_INSTANCE_ID": result.plan.instance_id.hex()}  # fmt: skip
    stack = contextlib.AsyncExitStack()
    try:
        if net is not None:
            # netns=None: this process already lives in the CVM's namespace, and naming it
            # would make pyroute2 fork helpers whose signals reach this loop's wakeup fd
            # (a SIGTERM to a helper read as the CVM's power-off).
            tunnel = await setup_gateway(
                agent, result.plan, wg=UserspaceBackend(net.run_dir / "wg"), report=report,
                reach=net.udp)  # fmt: skip
            if tunnel is not None:
                stack.push_async_callback(tunnel.close)
                env["DSTACK_GATEWAY_DOMAIN"] = tunnel.registration.domain
        await stack.enter_async_context(serve_agent(agent, dstack_sock=str(sock)))
    except BaseException:
        await stack.aclose()
        raise
    return Booted(stack, env)
