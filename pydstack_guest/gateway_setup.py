"""The boot's gateway step (dstack-util ``GatewayContext::setup``): register, then WireGuard.

It runs after the env is decrypted and before docker starts, as dstack's stage 1 does. An app
whose app-compose enables the gateway (``gateway_enabled``, older name ``tproxy_enabled``)
gets an RA-TLS client certificate from its agent (KMS keys: from the KMS's ``SignCert``, under
the app's CA; the gateway admits nothing else), registers its WireGuard key with each
sys-config ``gateway_urls`` entry in turn until one accepts, and brings up its tunnel with every
gateway node as a peer. A failure is ``BootFailed("gateway", ...)``: the boot halts, it never
loops (dstack #334)::

    tunnel = await setup_gateway(agent, plan, wg=UserspaceBackend(run_dir), report=emit)
    if tunnel: ...; await tunnel.close()

Where the host networking differs (the sandbox: a namespace with only a loopback), ``reach``
turns a gateway's WireGuard endpoint into one usable from inside (a UDP relay's address).

While it runs, the tunnel watches itself, as dstack's guest does (``wg-checker.sh`` calling
``dstack-util gateway-refresh --force``): no handshake with any gateway node within
``stale_s`` means the gateway forgot this CVM (a new key, port or data dir; a gateway that
only restarted handshakes by itself, ``pydstack.actors.gateway.endpoints``), so the CVM
registers again with the same WireGuard key (same tunnel address) and re-applies the nodes
it gets as its peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from cryptography import x509

from pydstack.adapters.wireguard import (
    PrivateKey,
    WireGuardBackend,
    WireGuardDevice,
    WireGuardError,
)

from .agent import GuestAgent
from .boot import AppCompose, BootFailed, BootPlan, Report
from .gateway_client import (
    GatewayAppCheck,
    GatewayRegistrationError,
    Registration,
    await_handshake,
    bring_up_tunnel,
    port_policy_of,
    refresh_tunnel,
    register_cvm,
)
from .provider import AppKeys

Reach = Callable[[str], Awaitable[str]]  # a gateway's "host:port" -> the endpoint to dial
Reregister = Callable[[], Awaitable[tuple[str, Registration]]]  # -> (url, registration)
IFNAME = "wg0"  # dstack's is dstack-wg0; wg0 fits every namespace (each has its own)
# A live tunnel handshakes at least every ~205 s: the CVM's keepalive (25 s) re-initiates
# once its session expires (180 s), whichever side initiated it. dstack's checker: 180 s.
STALE_S = 240.0
CHECK_S = 10.0  # dstack's checker looks every 10 s
_log = logging.getLogger("pydstack_guest.gateway")


def gateway_enabled(compose: AppCompose) -> bool:
    """dstack's ``AppCompose::gateway_enabled``: either flag (``tproxy_enabled`` is older)."""
    return compose.gateway_enabled or compose.tproxy_enabled


def gateway_urls(plan: BootPlan) -> tuple[str, ...]:
    """The gateways to register with; empty: skip the step (disabled, or none configured).

    dstack fails a boot that enables the gateway on a host naming none; here the host decides
    (``pydstack up --no-gateway`` has none) and the app is reached on its port maps instead."""
    if not gateway_enabled(plan.compose):
        return ()
    return tuple(plan.sys_config.gateway_urls)


@dataclass
class GatewayTunnel:
    registration: Registration
    url: str  # the gateway that accepted the registration (the latest one)
    device: WireGuardDevice
    reregistrations: int = 0
    _watch: asyncio.Task[None] | None = field(default=None, repr=False)

    def watch(self, reregister: Reregister, reach: Reach | None = None, *,
              stale_s: float = STALE_S, check_s: float = CHECK_S) -> None:  # fmt: skip
        """Start the stale-tunnel check (``close`` stops it). It logs, and reports no boot
        stage: the boot is over, and a stage after ``ready`` would read as booting again."""
        self._watch = asyncio.create_task(
            self._watching(reregister, reach, stale_s, check_s), name="gateway-watch"
        )

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.device.close()

    async def _latest_handshake(self) -> float:
        status = await self.device.status()
        return max((p.last_handshake or 0.0 for p in status.peers), default=0.0)

    async def _watching(self, reregister: Reregister, reach: Reach | None, stale_s: float,
                        check_s: float) -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        fresh_at = loop.time()  # the last time a recent handshake was seen (or the start)
        reached: dict[str, str] = {}  # relayed endpoints are kept: one relay per endpoint
        while True:
            await asyncio.sleep(check_s)
            try:
                latest = await self._latest_handshake()
                if latest and time.time() - latest < stale_s:
                    fresh_at = loop.time()
                    continue
                if loop.time() - fresh_at < stale_s:
                    continue
                await self._reregister(reregister, reach, reached)
                _log.warning("gateway: no handshake within %.0f s; registered again with %s, "
                             "tunnel ip %s", stale_s, self.url,
                             self.registration.client_ip)  # fmt: skip
                fresh_at = loop.time()  # the new registration gets the whole bound
            except asyncio.CancelledError:
                raise
            except Exception as e:  # gateway or KMS away: tried again at the next check
                _log.warning("gateway re-registration failed; retrying: %s: %s",
                             type(e).__name__, e)  # fmt: skip

    async def _reregister(self, reregister: Reregister, reach: Reach | None,
                          reached: dict[str, str]) -> None:  # fmt: skip
        url, reg = await reregister()
        if reach is not None:
            servers = []
            for s in reg.servers:
                if s.endpoint not in reached:
                    reached[s.endpoint] = await reach(s.endpoint)
                servers.append(replace(s, endpoint=reached[s.endpoint]))
            reg = replace(reg, servers=tuple(servers))
        await refresh_tunnel(self.device, reg, self.registration.client_ip)
        self.registration, self.url = reg, url
        self.reregistrations += 1
        await await_handshake(self.device, reg, timeout_s=5.0)


async def _identity(agent: GuestAgent) -> tuple[str, str]:
    """A fresh RA-TLS client certificate (chain, key) under the app's CA: with KMS keys the
    KMS's SignCert issues it (leaf, app CA, KMS root: what the gateway admits), with its
    quote and AppInfo embedded (dstack-util asks ext_app_info, and ext_quote for gateways
    that check the quote, as ours does)."""
    tls = await agent.tls_key(
        agent.fresh_tls_key(), subject="dstack-guest-agent", alt_names=(), usage_ra_tls=True,
        usage_server_auth=False, usage_client_auth=True, with_app_info=True,
    )  # fmt: skip
    return "".join(tls["certificate_chain"]), str(tls["key"])


def gateway_app_check(ca_pem: str, keys: AppKeys) -> GatewayAppCheck | None:
    """When the pinned gateway CA includes the KMS root, every app the KMS admits can get a
    server certificate under it: the gateway must then be the KMS's gateway app (its
    ``gateway_app_id``, exactly), as dstack's guest requires. Another CA (`up`'s own): None."""
    root = keys.kms_ca_cert_pem
    if not root:
        return None
    kms_root = x509.load_pem_x509_certificate(root.encode())
    pinned = x509.load_pem_x509_certificates(ca_pem.encode())
    if kms_root not in pinned:
        return None
    app = keys.gateway_app_id.lower().removeprefix("0x")
    if len(app) != 40 or any(c not in "0123456789abcdef" for c in app):
        raise BootFailed("gateway", "gateway_ca is the KMS root but the KMS names no single "
                         f"gateway app id ({keys.gateway_app_id!r}): refusing any app as the "
                         "gateway")  # fmt: skip
    return GatewayAppCheck(app)


async def _register(
    urls: tuple[str, ...], agent: GuestAgent, ca_pem: str, key: PrivateKey
) -> tuple[str, Registration]:
    identity = await _identity(agent)
    app_check = gateway_app_check(ca_pem, agent.keys)
    try:  # sent as dstack-util does, from the measured app-compose
        ports, restrict = port_policy_of(agent.config.app_compose)
    except GatewayRegistrationError as e:
        raise BootFailed("gateway", str(e)) from None
    errors = []
    for url in urls:  # dstack tries each gateway in turn
        try:
            reg = await register_cvm(url, identity=identity, ca_pem=ca_pem,
                                     wg_public_key=key.public_key().b64,
                                     ports=ports, restrict=restrict,
                                     app_check=app_check)  # fmt: skip
            return url, reg
        except GatewayRegistrationError as e:
            errors.append(str(e))
    raise BootFailed("gateway", "; ".join(errors))


async def setup_gateway(
    agent: GuestAgent,
    plan: BootPlan,
    *,
    wg: WireGuardBackend,
    report: Report,
    netns: str | None = None,
    reach: Reach | None = None,
) -> GatewayTunnel | None:
    """Register with a gateway and bring up WireGuard (None when the step does not apply)."""
    urls = gateway_urls(plan)
    if not urls:
        why = "disabled in app-compose" if not gateway_enabled(plan.compose) else (
            "enabled but sys-config names no gateway (gateway_urls is empty)")  # fmt: skip
        report("gateway", f"not registered: {why}")
        return None
    try:
        return await _setup(agent, plan, urls, wg, report, netns, reach)
    except BootFailed:
        raise
    except Exception as e:  # any failure stops the boot here, named by this step
        raise BootFailed("gateway", f"{type(e).__name__}: {e}") from e


async def _setup(
    agent: GuestAgent,
    plan: BootPlan,
    urls: tuple[str, ...],
    wg: WireGuardBackend,
    report: Report,
    netns: str | None,
    reach: Reach | None,
) -> GatewayTunnel:
    ca_pem = plan.sys_config.gateway_ca
    if not ca_pem:
        raise BootFailed("gateway", "sys-config has gateway_urls but no gateway_ca to trust")
    key = PrivateKey.generate()
    url, reg = await _register(urls, agent, ca_pem, key)
    try:
        ipaddress.IPv4Address(reg.client_ip)
        if reach is not None:
            servers = [replace(s, endpoint=await reach(s.endpoint)) for s in reg.servers]
            reg = replace(reg, servers=tuple(servers))
        device = await bring_up_tunnel(wg, IFNAME, key, reg, netns=netns)
    except (WireGuardError, OSError, ValueError) as e:
        raise BootFailed("gateway", f"WireGuard tunnel to {url}: {e}") from None
    peer = await await_handshake(device, reg)
    handshake = "handshake done" if peer else "no handshake yet (the gateway may be down)"
    report("gateway", f"registered with {url}: tunnel ip {reg.client_ip}, "
           f"{len(reg.servers)} gateway node(s), domain {reg.domain}; {handshake}")  # fmt: skip
    tunnel = GatewayTunnel(reg, url, device)
    tunnel.watch(lambda: _register(urls, agent, ca_pem, key), reach)
    return tunnel
