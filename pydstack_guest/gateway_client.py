"""A CVM's side of the gateway: ``RegisterCvm`` over mutual RA-TLS, then its WireGuard tunnel.

dstack's guest does this at boot (dstack-util ``setup``): it asks its agent for an RA-TLS client
certificate, posts its WireGuard public key and port policy to a gateway, and configures
``wg0`` with the address it got and every gateway node as a peer::

    reg = await register_cvm(url, identity=(chain_pem, key_pem), ca_pem=gateway_ca,
                             wg_public_key=key.public_key().b64)
    device = await bring_up_tunnel(backend, "wg0", key, reg, netns="cvm1")

The gateway learns the CVM's endpoint from its first handshake; the CVM keeps the tunnel warm
with a persistent keepalive so app-id routes (fresh handshakes only) find it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
from cryptography import x509

from pydstack.adapters.tdx.ratls import app_id_of
from pydstack.adapters.tdx.ratls_tls import (
    RaTlsConnector,
    RaTlsVerifier,
    client_ssl_context,
    peer_cert_der,
)
from pydstack.adapters.wireguard import (
    DeviceConfig,
    PeerConfig,
    PrivateKey,
    WireGuardBackend,
    WireGuardDevice,
)

# dstack v0.5.11's path (its prpc client names no service) and JSON mode: without `?json` (or
# a JSON content type) dstack's gateway reads the body as protobuf
PATH = "/prpc/RegisterCvm?json"
# a gateway answering this wants a quote in the client certificate (dstack's guest retries)
NO_ATTESTATION = "no attestation provided"


class GatewayRegistrationError(RuntimeError):
    """The gateway refused or could not be reached; the message has its code and reason."""


@dataclass(frozen=True, slots=True)
class GatewayServer:
    public_key: str
    tunnel_ip: str
    endpoint: str


@dataclass(frozen=True, slots=True)
class Registration:
    client_ip: str
    servers: tuple[GatewayServer, ...]
    domain: str
    raw: dict[str, Any]


def parse_registration(body: dict[str, Any]) -> Registration:
    wg = body["wg"]
    servers = tuple(
        GatewayServer(public_key=s["pk"], tunnel_ip=s["ip"], endpoint=s["endpoint"])
        for s in wg["servers"]
    )
    return Registration(wg["client_ip"], servers, body.get("agent", {}).get("domain", ""), body)


class _PortAttrs(msgspec.Struct):
    port: int
    pp: bool = False


class _PortPolicy(msgspec.Struct):
    ports: list[_PortAttrs] = []
    restrict_mode: bool = False


class _ComposePorts(msgspec.Struct):
    port_policy: _PortPolicy = msgspec.field(default_factory=_PortPolicy)


def port_policy_of(app_compose: str) -> tuple[list[dict[str, Any]], bool]:
    """(ports, restrict_mode) of an app-compose's ``port_policy`` (dstack-types: both
    default empty / false), as ``register_cvm`` sends them; a port outside 0-65535 is an
    error, as dstack's ``u16`` field refuses it at boot."""
    try:
        doc = msgspec.json.decode(app_compose, type=_ComposePorts)
    except msgspec.DecodeError as e:
        raise GatewayRegistrationError(f"app-compose port_policy: {e}") from None
    bad = [p.port for p in doc.port_policy.ports if not 0 <= p.port <= 65535]
    if bad:
        raise GatewayRegistrationError(f"app-compose port_policy: port {bad[0]} is not a u16")
    ports = [{"port": p.port, "pp": p.pp} for p in doc.port_policy.ports]
    return ports, doc.port_policy.restrict_mode


class GatewayAppCheck:
    """The gateway's certificate must name this app id (OID 1.3, as dstack's guest checks
    its gateway's, `AppIdValidator`): needed when the pinned CA is the KMS root, under which
    every admitted app can get a server certificate."""

    def __init__(self, gateway_app_id: str) -> None:
        self.want = gateway_app_id.lower().removeprefix("0x")

    def refusal(self, der: bytes | None) -> str | None:
        if der is None:
            return "the gateway sent no certificate"
        try:
            got = app_id_of(x509.load_der_x509_certificate(der))
        except ValueError as exc:
            return f"the gateway's certificate does not parse: {exc}"
        if got is None or got.hex() != self.want:
            return (f"the gateway's certificate names app {got.hex() if got else '(none)'}, "
                    f"not the KMS's gateway app {self.want}")  # fmt: skip
        return None


class _AppCheckedConnector(aiohttp.TCPConnector):
    """Refuses the connection before any request byte when the gateway's leaf is another
    app's (same post-handshake hook as ratls_tls.RaTlsConnector)."""

    def __init__(self, check: GatewayAppCheck, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._check = check

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        proto = await super()._create_connection(req, traces, timeout)
        if (why := self._check.refusal(peer_cert_der(proto.transport))) is not None:
            proto.close()
            raise GatewayRegistrationError(why)
        return proto


async def register_cvm(
    url: str,
    *,
    identity: tuple[str, str],
    ca_pem: str,
    wg_public_key: str,
    ports: list[dict[str, Any]] | None = None,
    restrict: bool = False,
    verifier: RaTlsVerifier | None = None,
    timeout_s: float = 30.0,
    quoted_identity: tuple[str, str] | None = None,
    app_check: GatewayAppCheck | None = None,
) -> Registration:
    """POST RegisterCvm presenting ``identity`` (RA-TLS chain and key PEM); the gateway's
    certificate must chain to ``ca_pem`` (and carry evidence ``verifier`` accepts, if given).

    As dstack-util does: the port policy is always sent (``ports``: ``{"port", "pp"}``
    dicts, ``restrict``: dstack's ``restrict_mode``), and when the gateway answers "no
    attestation provided", the request is sent again with ``quoted_identity`` (a certificate
    carrying the quote, for gateways that do not take the KMS's app-info certificate)."""
    policy = {"ports": ports or [], "restrict_mode": restrict}
    body = json.dumps({"client_public_key": wg_public_key, "port_policy": policy})
    try:
        return await _post(url, identity, ca_pem, body, verifier, timeout_s, app_check)
    except GatewayRegistrationError as e:
        if quoted_identity is None or NO_ATTESTATION not in str(e):
            raise
    return await _post(url, quoted_identity, ca_pem, body, verifier, timeout_s, app_check)


async def _post(
    url: str,
    identity: tuple[str, str],
    ca_pem: str,
    body: str,
    verifier: RaTlsVerifier | None,
    timeout_s: float,
    app_check: GatewayAppCheck | None = None,
) -> Registration:
    ctx: ssl.SSLContext = client_ssl_context(identity[0], identity[1], ca_pem)
    conn: aiohttp.TCPConnector
    if verifier is not None:
        conn = RaTlsConnector(verifier, ssl=ctx)
    elif app_check is not None:
        conn = _AppCheckedConnector(app_check, ssl=ctx)
    else:
        conn = aiohttp.TCPConnector(ssl=ctx)
    try:
        async with aiohttp.ClientSession(
            connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as s:
            async with s.post(url.rstrip("/") + PATH, data=body) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise GatewayRegistrationError(
                        f"gateway {url} refused the registration ({resp.status}): {text[:300]}"
                    )
                return parse_registration(json.loads(text))
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise GatewayRegistrationError(f"gateway {url}: {type(exc).__name__}: {exc}") from None


async def bring_up_tunnel(
    backend: WireGuardBackend,
    ifname: str,
    key: PrivateKey,
    reg: Registration,
    *,
    netns: str | None = None,
    prefix: int = 24,
    keepalive: int = 25,
) -> WireGuardDevice:
    """The CVM's WireGuard device: its address, every gateway node as a peer (the caller
    closes it). ``prefix`` is the tunnel network's (every node and CVM inside it)."""
    device = await backend.create(ifname, netns)
    try:
        await device.configure(DeviceConfig(private_key=key))
        net = ipaddress.IPv4Interface(f"{reg.client_ip}/{prefix}")
        await device.set_address(str(net))
        await device.sync_peers(_peers(reg, keepalive))
    except BaseException:
        await device.close()
        raise
    return device


def _peers(reg: Registration, keepalive: int) -> list[PeerConfig]:
    return [
        PeerConfig(
            public_key=s.public_key,
            allowed_ips=(f"{s.tunnel_ip}/32",),
            endpoint=s.endpoint,
            persistent_keepalive=keepalive,
        )
        for s in reg.servers
    ]


async def refresh_tunnel(
    device: WireGuardDevice, reg: Registration, old_ip: str, *, prefix: int = 24,
    keepalive: int = 25,
) -> None:  # fmt: skip
    """After registering again: the nodes of ``reg`` become the peers, each added afresh
    (a dead session is dropped, and the keepalive of a new peer starts a handshake at once);
    the address changes only if the gateway gave another one."""
    if reg.client_ip != old_ip:
        await device.set_address(str(ipaddress.IPv4Interface(f"{reg.client_ip}/{prefix}")))
    await device.sync_peers([])
    await device.sync_peers(_peers(reg, keepalive))


async def await_handshake(
    device: WireGuardDevice, reg: Registration, *, timeout_s: float = 20.0, nudge_s: float = 1.0
) -> str | None:
    """Wait for a completed handshake with any gateway node; returns its public key, or None
    at the deadline. The first handshake initiation races the gateway adding this peer (it
    learns of it from the log), and a dropped initiation is only retried after wireguard-go's
    5 s rekey timeout; each nudge (a datagram to every node's tunnel address) queues traffic
    so a new initiation follows as soon as wireguard-go allows. Until a handshake is done
    the gateway cannot route to this CVM, so "ready" waits for it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        status = await device.status()
        done = [p.public_key for p in status.peers if p.last_handshake]
        if done:
            return done[0]
        if loop.time() >= deadline:
            return None
        for server in reg.servers:
            with contextlib.suppress(OSError), socket.socket(type=socket.SOCK_DGRAM) as udp:
                udp.setblocking(False)
                udp.sendto(b"pydstack: handshake", (server.tunnel_ip, 9))  # discard port
        await asyncio.sleep(min(nudge_s, max(0.0, deadline - loop.time())))
