"""Start one gateway node from plain options: used by ``python -m pydstack.actors.gateway``,
``pydstack up`` and the benchmarks.

    async with running_node(store, NodeLaunch(node=NodeConfig(...), state_dir=...)) as rn:
        rn.node.status(); rn.admin_url; rn.proxy_port; rn.registration_url

It owns what it creates, in this order and undone in reverse: the forwarding guard of its
interface (nftables, in its namespace: nothing is forwarded into or out of the tunnel, so a
CVM reaches no other CVM through it; ``forward_guard=False`` leaves it out), the WireGuard
device (``wg_backend``: the kernel's where it works, else wireguard-go; a stale interface
left by a killed node is removed first; the key lives in ``state_dir/wg.key`` so a restarted
node keeps its identity, the peers' endpoints in ``state_dir/endpoints.json`` so it
handshakes with them at once: ``endpoints.py``), the proxy, the node's loops, the
RegisterCvm endpoint (mutual RA-TLS) and the admin endpoint.

Certificates come from ``certs`` (a static provider) or, with ``acme``, from the log: the
node serves what is recorded for its cluster's domains (keys unsealed with the cluster key),
adds its base domain when given an ACME directory, and, when it has DNS providers, runs a
``CertKeeper`` that takes part in ordering and renewing (one order per domain cluster-wide,
decided through OCC on the domain's subject).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from aiohttp import web

from pydstack.adapters.acme import DnsProvider
from pydstack.adapters.firewall import FirewallError, ForwardGuard, RulesError
from pydstack.adapters.nats import EventStore
from pydstack.adapters.proxy import AppAddressResolver, CertProvider, ProxyConfig, ProxyServer
from pydstack.adapters.proxy.app_address import PREFIX, AppAddressError, DnsAppAddress
from pydstack.adapters.secretfile import write_secret
from pydstack.adapters.tdx.collateral import CollateralCache
from pydstack.adapters.tdx.devpccs import dev_collateral
from pydstack.adapters.tdx.ratls import Attester
from pydstack.adapters.tdx.ratls_tls import RaTlsVerifier
from pydstack.adapters.wireguard import BackendUnavailable, DeviceError, PrivateKey, pick_backend
from pydstack.adapters.wireguard import netns as ns
from pydstack.adapters.wireguard.choice import Wanted as WgWanted
from pydstack.core.gateway.certs import AddDomain, CertStore
from pydstack.core.gateway.sealing import ClusterKey

from .app_cert import AppCertError, KmsAppCert, kms_app_cert
from .cert_provider import LogCertProvider
from .certs import CertKeeper, CertKeeperConfig, ensure_domain
from .client_chain import AppChainCheck, kms_cas
from .endpoints import EndpointBook
from .node import GatewayNode, NodeConfig
from .node_admin import admin_app
from .registrar import Registrar, RegistrarConfig
from .registration import RegistrationConfig, registration_app, serve_registration

_log = structlog.get_logger("pydstack.gateway.node")
INTEL_PCCS = "https://api.trustedservices.intel.com/tdx/certification/v4"


@dataclass(frozen=True, slots=True)
class RegistrationLaunch:
    """The RegisterCvm endpoint: TLS identity, the CA(s) client certificates chain to, and
    the quote trust (a simulator PKI root in dev, Intel's via a PCCS otherwise)."""

    chain_pem: str
    key_pem: str
    client_ca_pem: str
    host: str = "127.0.0.1"
    port: int = 0
    dev_pki: str | None = None  # directory of a DevPki: trust simulated quotes (dev only)
    # Where collateral comes from; None: Intel's PCS, or with dev_pki the dev PKI's own (a
    # URL with dev_pki: a PCCS serving the dev PKI, pydstack.adapters.tdx.devpccs).
    pccs_url: str | None = None
    auth_webhook: str | None = None
    log_auth: bool = False  # RegistrationConfig.log_auth (up with the KMS's log backend)
    # The served certificate from the KMS as the gateway app (`app_cert.py`; then chain_pem
    # and key_pem are unused): what a dstack guest checks. Its evidence: `kms_cert.guest_agent`
    # or `attester` (a simulated TD: dev only, announced).
    kms_cert: KmsAppCert | None = None
    attester: Attester | None = None


@dataclass(frozen=True, slots=True)
class AcmeLaunch:
    """Certificates from the log. ``cluster_key`` opens them; ``directory``: the node's base
    domain is added (if it is not yet) with this ACME directory; ``dns``: DNS-01 providers by
    the name domains give (none: the node serves, never orders)."""

    cluster_key: ClusterKey
    directory: str = ""
    dns: Mapping[str, DnsProvider] = field(default_factory=dict)
    ca_bundle: str | None = None  # the ACME server's HTTPS CA (None: the system's roots)
    contact: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeLaunch:
    node: NodeConfig
    state_dir: Path
    ifname: str = "dgw0"
    netns: str | None = None  # the device's namespace (None: this process's)
    proxy_host: str = "0.0.0.0"
    proxy_port: int = 443
    certs: CertProvider | None = None
    acme: AcmeLaunch | None = None  # certificates from the log (instead of ``certs``)
    admin_host: str = "127.0.0.1"
    admin_port: int = 0  # 0: any free port; -1: none
    registration: RegistrationLaunch | None = None
    address_plan: str = "10.0.0.0/25"  # where CVM addresses come from
    forward_guard: bool = True  # nftables: drop forwarding into/out of the interface
    # auto: the kernel's WireGuard where a wireguard link can be made, else wireguard-go
    wg_backend: WgWanted = "auto"
    # custom domains' app addresses from DNS TXT, as dstack's `app_address_ns_prefix` and
    # `app_address_ns_compat` (also the legacy `_tapp-address`); False: custom domains refused
    app_address_dns: bool = True
    app_address_ns_prefix: str = PREFIX
    app_address_ns_compat: bool = True


@dataclass
class RunningNode:
    node: GatewayNode
    proxy_port: int
    admin_url: str
    registration_url: str


class _NoCerts:
    def server_context(self, base_domain: str, *, h2: bool) -> ssl.SSLContext | None:
        return None


def load_or_create_key(path: Path) -> PrivateKey:
    """The node's WireGuard key (base64, 0600), made on first use."""
    if path.exists():
        return PrivateKey.from_b64(path.read_text().strip())
    key = PrivateKey.generate()
    write_secret(path, key.b64 + "\n", overwrite=False)
    return key


async def _remove_stale_link(netns: str | None, ifname: str) -> None:
    """A node killed with -9 leaves its interface and wireguard-go behind; deleting the link
    makes that wireguard-go exit, then its UAPI socket stops answering."""
    if not await ns.link_exists(netns, ifname):
        return
    _log.warning("removing a stale interface", ifname=ifname, netns=netns or "<host>")
    await ns.delete_link(netns, ifname)
    for _ in range(100):
        if not await ns.link_exists(netns, ifname):
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # let the old daemon close its socket


async def _guard_forwarding(launch: NodeLaunch, stack: contextlib.AsyncExitStack) -> None:
    """Before the interface exists (nft matches it by name): no window where it forwards."""
    netns = Path(f"/var/run/netns/{launch.netns}") if launch.netns else None
    guard = ForwardGuard(launch.ifname, netns=netns)
    try:
        await guard.apply()
    except (FirewallError, RulesError) as e:
        raise DeviceError(
            f"gateway node {launch.node.node_id}: cannot guard {launch.ifname} against "
            f"forwarding between CVMs: {e}; install nftables (make sysdeps), or run without "
            "the guard (--no-forward-guard) where nothing forwards"
        ) from None

    async def remove() -> None:
        try:
            await guard.remove()
        except FirewallError as e:  # the interface is gone already: its rules match nothing
            _log.warning("forwarding guard not removed", table=guard.table, error=str(e))

    stack.push_async_callback(remove)


def _verifier(reg: RegistrationLaunch) -> RaTlsVerifier:
    """RegisterCvm's quote check. Collateral is kept per platform (`CollateralCache`, as the
    KMS does): every registration brings a new certificate, so the verifier's per-certificate
    cache alone left one PCCS round trip per request (slow, and a flood's amplifier)."""
    if reg.dev_pki is None:
        return RaTlsVerifier(CollateralCache.pccs(reg.pccs_url or INTEL_PCCS))
    root = (Path(reg.dev_pki) / "root.der").read_bytes()
    source = CollateralCache.pccs(reg.pccs_url) if reg.pccs_url else dev_collateral(reg.dev_pki)
    return RaTlsVerifier(source, root_ca_der=root)


async def _client_chain(store: EventStore, node_id: str, reg: RegistrationLaunch) -> AppChainCheck:
    """Registration admits only KMS SignCert chains (`client_chain.py`) under the given
    client CAs, minus every KMS temp CA on the log (its key is public)."""
    _, temps = await kms_cas(store)
    check = AppChainCheck.from_pem(reg.client_ca_pem, never_pem=temps)
    if not check.roots:
        raise DeviceError(
            f"gateway node {node_id}: the client CA holds no KMS root CA (only KMS temp CAs, "
            "whose keys GetTempCaCert gives to anyone); give the KMS root CA "
            "(KmsRootCreated.ca_cert_pem, GetMeta's ca_cert)"
        )
    if check.never & AppChainCheck.from_pem(reg.client_ca_pem).roots:
        _log.warning("KMS temp CAs in the client CA are not trusted for registration",
                     node=node_id)  # fmt: skip
    return check


async def registration_identity(node_id: str, reg: RegistrationLaunch) -> tuple[str, str]:
    """(chain PEM, key PEM) RegisterCvm serves: the KMS's certificate for the gateway app when
    `reg.kms_cert` is set, else the static one given."""
    spec = reg.kms_cert
    if spec is None:
        return reg.chain_pem, reg.key_pem
    if spec.guest_agent and reg.attester is not None:
        raise DeviceError(f"gateway node {node_id}: the certificate's evidence comes from the "
                          "guest agent or a given attester, not both")  # fmt: skip
    attester = reg.attester
    if spec.guest_agent:
        from pydstack.actors.kms.selfevidence import GuestAgentAttester

        attester = GuestAgentAttester(spec.guest_agent)
    elif attester is None:
        raise DeviceError(
            f"gateway node {node_id}: a KMS certificate for the gateway app needs evidence: "
            "give the guest agent socket of the CVM the node runs in"
        )
    else:
        _log.warning("registration certificate: evidence from a SIMULATED TD (dev only, no "
                     "confidentiality)", node=node_id, app_id=spec.app_id.hex())  # fmt: skip
    try:
        return await kms_app_cert(spec, attester)
    except AppCertError as e:
        raise DeviceError(f"gateway node {node_id}: {e}") from None


async def _serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server  # aiohttp exposes the bound port only here
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    return runner, int(sockets[0].getsockname()[1]) if sockets else port


async def _start_acme(
    store: EventStore, cfg: NodeConfig, acme: AcmeLaunch, stack: contextlib.AsyncExitStack
) -> None:
    if acme.directory:
        cmd = AddDomain(domain=cfg.base_domain, acme_directory=acme.directory, contact=acme.contact)
        if await ensure_domain(store, cfg.cluster, cmd):
            _log.info("base domain added", domain=cfg.base_domain, acme_directory=acme.directory)
    if acme.dns:
        keeper_cfg = CertKeeperConfig(
            cluster=cfg.cluster, node_id=cfg.node_id, ca_bundle=acme.ca_bundle
        )
        keeper = CertKeeper(store, acme.cluster_key, keeper_cfg, acme.dns)
        await stack.enter_async_context(keeper.running())


def _app_address(launch: NodeLaunch) -> AppAddressResolver | None:
    if not launch.app_address_dns:
        return None
    try:
        return DnsAppAddress(prefix=launch.app_address_ns_prefix,
                             compat=launch.app_address_ns_compat)  # fmt: skip
    except AppAddressError as exc:
        _log.warning("custom domains refused: no DNS resolver", error=str(exc))
        return None


@contextlib.asynccontextmanager
async def running_node(store: EventStore, launch: NodeLaunch) -> AsyncIterator[RunningNode]:
    key = load_or_create_key(launch.state_dir / "wg.key")
    try:
        backend, choice = await pick_backend(launch.wg_backend, run_dir=launch.state_dir / "wg")
    except BackendUnavailable as exc:
        raise DeviceError(f"gateway node {launch.node.node_id}: {exc}") from None
    _log.info("wireguard backend", node=launch.node.node_id, backend=choice.backend,
              reason=choice.reason)  # fmt: skip
    # the node reports it (status, GatewayNodeJoined): operators see which one carries CVMs
    cfg = dataclasses.replace(
        launch.node, wg_backend=choice.backend, wg_backend_reason=choice.reason
    )
    await _remove_stale_link(launch.netns, launch.ifname)
    log_certs = LogCertProvider(CertStore(launch.acme.cluster_key)) if launch.acme else None
    async with contextlib.AsyncExitStack() as stack:
        if launch.acme is not None:
            await _start_acme(store, cfg, launch.acme, stack)
        if launch.forward_guard:
            await _guard_forwarding(launch, stack)
        else:
            _log.warning("no forwarding guard: with ip_forward on, CVMs reach each other "
                         "through this node", ifname=launch.ifname)  # fmt: skip
        device = await backend.create(launch.ifname, launch.netns)
        stack.push_async_callback(device.close)
        proxy = await ProxyServer.create(
            ProxyConfig(host=launch.proxy_host, port=launch.proxy_port),
            log_certs or launch.certs or _NoCerts(),
            resolve_app_address=_app_address(launch),
        )
        await stack.enter_async_context(proxy)
        from pydstack.core.gateway.cluster import AddressPlan

        registrar = Registrar(
            store,
            RegistrarConfig(
                cluster=cfg.cluster, node_id=cfg.node_id, plan=AddressPlan(launch.address_plan)
            ),
        )
        endpoints = EndpointBook(launch.state_dir / "endpoints.json")
        node = GatewayNode(store, device, proxy, cfg, key, registrar=registrar, certs=log_certs,
                           endpoints=endpoints)  # fmt: skip
        await stack.enter_async_context(node.running())
        reg_url = ""
        if launch.registration is not None:
            reg = launch.registration
            from pydstack.adapters.tdx.ratls_tls import server_ssl_context

            chain_check = await _client_chain(store, cfg.node_id, reg)
            app = registration_app(
                registrar,
                _verifier(reg),
                RegistrationConfig(
                    node_id=cfg.node_id,
                    auth_webhook=reg.auth_webhook,
                    log_auth=reg.log_auth,
                    app_address_ns_prefix=launch.app_address_ns_prefix,
                ),
                peer_applied=node.wait_peer_applied,
                client_chain=chain_check,
            )
            chain_pem, key_pem = await registration_identity(cfg.node_id, reg)
            ssl_ctx = server_ssl_context(chain_pem, key_pem, chain_check.roots_pem)
            runner = await serve_registration(app, reg.host, reg.port, ssl_ctx)
            stack.push_async_callback(runner.cleanup)
            reg_url = cfg.url or f"https://{reg.host}:{reg.port}"
        admin_url = ""
        if launch.admin_port >= 0:
            admin_runner, port = await _serve(admin_app(node), launch.admin_host, launch.admin_port)
            stack.push_async_callback(admin_runner.cleanup)
            admin_url = f"http://{launch.admin_host}:{port}"
        _log.info("gateway node serving", node=cfg.node_id, proxy_port=proxy.port,
                  admin=admin_url, registration=reg_url, tunnel_ip=node.tunnel_ip)  # fmt: skip
        yield RunningNode(node, proxy.port, admin_url, reg_url)
