"""The gateway node ``pydstack up`` runs: options from the data dir, dev or ACME certificates.

One node, in the host namespace (wireguard-go works there), listening on ``listen`` (the
address CVMs reach: NATS's listen address unless given), on the same ports after a restart
when they are free (``DATA/gateway/ports.json``). By default (offline) it serves a
dev wildcard certificate for its base domain from a dev CA kept in ``DATA/gateway/``
(``ca.pem`` is what clients and simulated CVMs trust). With ``acme_directory`` it serves the
certificates on the log instead: it adds its base domain with that ACME directory, orders and
renews through DNS-01 when it has a DNS provider (``rfc2136`` or ``challtestsrv``), and opens
the keys with the cluster key from ``DATA/gateway/cluster.secret`` (made once; copy it to the
other nodes of the cluster, ``--cluster-secret``). The RegisterCvm endpoint keeps its dev CA
identity. CVM client certificates must be KMS ``SignCert`` certificates of their app, chaining
to the KMS root CA of up's cluster on the log (``KmsRootCreated``; never its temp CA), quotes to the
dev PKI where the host has no TDX::

    launch = await up_launch(store, data_path, UpGateway(domain="gw.localhost", listen=...))
    async with running_node(store, launch) as rn: ...
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pydstack.actors.kms.pin import read_pin
from pydstack.adapters.acme import Rfc2136Config
from pydstack.adapters.nats import EventStore
from pydstack.adapters.ports import bindable, free_port
from pydstack.adapters.proxy import StaticCertProvider
from pydstack.adapters.secretfile import write_secret

from .client_chain import kms_cas
from .node import NodeConfig
from .node_launch import AcmeLaunch, NodeLaunch, RegistrationLaunch, _remove_stale_link


@dataclass(frozen=True, slots=True)
class UpGateway:
    domain: str = "gw.localhost"
    listen: str = "127.0.0.1"
    proxy_port: int = 0  # 0: 8443 when free, else any free port
    registration_port: int = 0  # 0: 8011 when free, else any free port
    wg_port: int = 0  # 0: 51820 when free, else any free UDP port
    node_id: str = "gw1"
    dev_pki: str | None = None
    acme_directory: str = ""  # "": the dev CA's wildcard; else certificates from this ACME CA
    acme_ca_bundle: str | None = None  # the ACME server's HTTPS CA (None: the system's roots)
    challtestsrv: str = ""  # DNS-01 through pebble-challtestsrv at this URL ("": none)
    rfc2136: Rfc2136Config | None = None  # DNS-01 by TSIG-signed updates (dns_providers)
    forward_guard: bool = True  # NodeLaunch.forward_guard
    log_auth: bool = False  # admit only composes the app's events on the log name (KMS: log)


_SERVER, _CLIENT = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH


def _free(host: str, want: int, kind: int = socket.SOCK_STREAM) -> int:
    """`want` when it is free, else a free port the node can still bind later (not ephemeral)."""
    return want if bindable(host, want, kind) else free_port(host, kind)


def _rebindable(host: str, port: int, kind: int) -> bool:
    """Whether our servers can bind `port` again: they set SO_REUSEADDR, so the connections
    of the last run still in TIME_WAIT do not count (a listener does)."""
    if kind != socket.SOCK_STREAM:
        return bindable(host, port, kind)
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class _Ports:
    """The ports up's node picked, kept in ``DATA/gateway/ports.json``: a restarted ``up``
    takes the same ones when they are free. CVMs hold them (the registration URL in their
    sys-config, the WireGuard endpoint as their peer's), and so do users' URLs (the proxy)."""

    def __init__(self, gdir: Path) -> None:
        self.path = gdir / "ports.json"
        try:
            raw = json.loads(self.path.read_text())
            self.saved = {str(k): int(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        except (OSError, ValueError, TypeError):
            self.saved = {}

    def pick(self, name: str, host: str, asked: int, default: int,
             kind: int = socket.SOCK_STREAM) -> int:  # fmt: skip
        if asked:
            port = _free(host, asked, kind)
        else:
            last = self.saved.get(name, 0)
            port = last if last and _rebindable(host, last, kind) else _free(host, default, kind)
        self.saved[name] = port
        return port

    def save(self) -> None:
        _write(self.path, json.dumps(self.saved, sort_keys=True).encode())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], names: list[str], ips: list[str]
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.ExtendedKeyUsage([_SERVER, _CLIENT]), critical=False)
        .sign(ca[1], hashes.SHA256())
    )
    ca_pem = ca[0].public_bytes(serialization.Encoding.PEM)
    return cert.public_bytes(serialization.Encoding.PEM) + ca_pem, _key_pem(key)


def dev_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The dev gateway CA (``ca.pem`` / ``ca.key``), made once per data dir."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pydstack dev gateway CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_secret(key_path, _key_pem(key))
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


async def kms_client_cas(store: EventStore, cluster: str = "") -> str:
    """The CAs CVM certificates chain to: the KMS root CA of `cluster` (every cluster's when
    ""), as on the log. Never a temp CA: its key is public (`client_chain.py`)."""
    roots, _ = await kms_cas(store, cluster)
    return roots


def _acme(gdir: Path, gw: UpGateway, cluster: str) -> AcmeLaunch:
    from pydstack.adapters.acme import create_cluster_secret, load_cluster_key

    from .dns_providers import dns_providers

    secret = gdir / "cluster.secret"
    if not secret.exists():
        create_cluster_secret(secret)
    return AcmeLaunch(
        cluster_key=load_cluster_key(secret, cluster), directory=gw.acme_directory,
        dns=dns_providers(gw.challtestsrv, gw.rfc2136), ca_bundle=gw.acme_ca_bundle,
    )  # fmt: skip


async def up_launch(store: EventStore, data_path: Path, gw: UpGateway) -> NodeLaunch:
    """Options for up's node; files in ``DATA/gateway`` (key, dev CA and certificates)."""
    gdir = data_path / "gateway"
    ca = dev_ca(gdir)
    wild_chain, wild_key = _leaf(ca, [f"*.{gw.domain}", gw.domain], [])
    reg_chain, reg_key = _leaf(ca, ["localhost"], sorted({gw.listen, "127.0.0.1"}))
    tag = hashlib.sha256(str(data_path).encode()).hexdigest()[:8]
    # An up killed with -9 left its wireguard-go holding the WireGuard port: stop it before
    # picking, or the port its CVMs know is taken and the node comes back on another one.
    await _remove_stale_link(None, f"dgw{tag}")
    ports = _Ports(gdir)
    reg_port = ports.pick("registration", gw.listen, gw.registration_port, 8011)
    wg_port = ports.pick("wireguard", gw.listen, gw.wg_port, 51820, socket.SOCK_DGRAM)
    proxy_port = ports.pick("proxy", gw.listen, gw.proxy_port, 8443)
    ports.save()
    pin = read_pin(data_path)  # up's KMS cluster, once its KMS served (else every cluster's)
    client_cas = await kms_client_cas(store, pin.cluster if pin is not None else "")
    registration = None
    if client_cas:
        registration = RegistrationLaunch(
            reg_chain.decode(), reg_key.decode(), client_cas, host=gw.listen, port=reg_port,
            dev_pki=gw.dev_pki, log_auth=gw.log_auth,
        )  # fmt: skip
    acme = _acme(gdir, gw, "default") if gw.acme_directory else None
    node = NodeConfig(
        node_id=gw.node_id, base_domain=gw.domain, endpoint=f"{gw.listen}:{wg_port}",
        url=f"https://{gw.listen}:{reg_port}" if registration else "", listen_port=wg_port,
    )  # fmt: skip
    return NodeLaunch(
        node=node,
        state_dir=gdir / gw.node_id,
        ifname=f"dgw{tag}",
        proxy_host=gw.listen,
        proxy_port=proxy_port,
        certs=None if acme else StaticCertProvider({gw.domain: (wild_chain, wild_key)}),
        acme=acme,
        admin_host="127.0.0.1",
        admin_port=0,
        registration=registration,
        forward_guard=gw.forward_guard,
    )
