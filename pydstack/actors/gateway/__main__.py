"""Run one gateway node: ``python -m pydstack.actors.gateway --nats URL --node-id gw1 ...``.

    python -m pydstack.actors.gateway --nats nats://10.9.0.1:4222 --node-id gw1 \\
        --netns gw1 --base-domain app.example.com --endpoint 10.9.0.11:51820 \\
        --state-dir /var/lib/pydstack/gw1 --cert-chain wild.pem --cert-key wild.key \\
        --registration-port 8011 --tls-chain node.pem --tls-key node.key --client-ca kms-ca.pem

The RegisterCvm endpoint admits a CVM only with its KMS ``SignCert`` chain under
``--client-ca`` (the KMS root CA; KMS temp CAs are never trusted). Its own certificate is
``--tls-chain/--tls-key``, or, with ``--kms-url URL --gateway-app-id HEX --guest-agent
SOCKET``, the KMS's for the gateway app, as dstack's gateway CVM gets it (what dstack guests
check: ``app_cert.py``); ``--log-auth`` also admits
only compose hashes the app's events on the log name, ``--auth-webhook URL`` asks a webhook.

``--netns NAME`` runs the whole node inside that network namespace (its WireGuard device, the
proxy, the RegisterCvm and admin endpoints, and its NATS connection, so NATS must be reachable
from there). Prints one line ``GATEWAY_READY {json}`` on stdout once it serves.
Certificates for the base domain: ``--cert-chain/--cert-key`` (a static wildcard), or
``--cluster-secret FILE`` to serve what the cluster's ACME keepers put on the log (every
domain of the cluster, renewals swapped in as they land). With it, ``--acme-directory URL``
adds the node's base domain with that ACME directory (if not there yet), and a DNS-01
provider makes the node order and renew certificates too (``--acme-ca-bundle``: the ACME
server's HTTPS CA): ``--rfc2136-server HOST[:PORT]`` with ``--rfc2136-zone``,
``--rfc2136-tsig-name``, ``--rfc2136-tsig-algorithm`` and ``--rfc2136-tsig-secret-file FILE``
(TSIG-signed dynamic updates to the zone's primary, provider name ``rfc2136``), or
``--challtestsrv URL`` (pebble-challtestsrv, ``challtestsrv``); the default provider ``""``
is RFC 2136 when given (``dns_providers``)::

    python -m pydstack.actors.gateway ... --cluster-secret secret.hex \
        --acme-directory https://acme-v02.api.letsencrypt.org/directory \
        --rfc2136-server 192.0.2.53 --rfc2136-zone example.com \
        --rfc2136-tsig-name acme-key --rfc2136-tsig-secret-file /etc/pydstack/tsig.secret
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from pydstack.logs import configure
from pydstack.loop import run as run_loop

from .dns_providers import rfc2136_config, rfc2136_options

_CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Move this (still single-threaded) process into a named network namespace."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise click.ClickException(f"cannot enter netns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _read(path: str | None) -> str | None:
    return Path(path).read_text() if path else None


@click.command()
@click.option("--nats", "nats_url", required=True, envvar="PYDSTACK_NATS")
@click.option("--creds", type=click.Path(dir_okay=False),
              help="nkey seed file of a gateway identity on the keyring (required)")  # fmt: skip
@click.option("--keyring", type=click.Path(dir_okay=False), default=None,
              help="keyring.json whose admin key roots the log's keyring (pinned)")  # fmt: skip
@click.option("--identity", default="gateway", show_default=True, help="signer name")
@click.option("--stream", default="DSTACK", show_default=True)
@click.option("--node-id", required=True)
@click.option("--cluster", default="default", show_default=True)
@click.option("--netns", default=None, help="run the node inside this network namespace")
@click.option("--base-domain", required=True)
@click.option("--endpoint", required=True, help="ip:port CVMs reach the WireGuard listener at")
@click.option("--listen-port", type=int, default=51820, show_default=True)
@click.option("--ifname", default="dgw0", show_default=True)
@click.option("--tunnel-ip", default="", help="[default: kept, else first free in 10.0.0.128/25]")
@click.option("--tunnel-net", default="10.0.0.0/24", show_default=True)
@click.option("--address-plan", default="10.0.0.0/25", show_default=True, help="CVM addresses")
@click.option("--state-dir", required=True, type=click.Path(file_okay=False))
@click.option("--proxy-host", default="0.0.0.0", show_default=True)
@click.option("--proxy-port", type=int, default=443, show_default=True)
@click.option("--admin-host", default="127.0.0.1", show_default=True)
@click.option("--admin-port", type=int, default=0, help="0: any free port, -1: none")
@click.option("--cert-chain", type=click.Path(exists=True, dir_okay=False))
@click.option("--cert-key", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--cluster-secret",
    type=click.Path(exists=True, dir_okay=False),
    help="serve the certificates on the log (keys sealed to this secret's key)",
)
@click.option("--acme-directory", default="", help="add the base domain with this ACME CA")
@click.option("--acme-ca-bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--acme-contact", multiple=True, help="mailto: URI for the ACME account")
@click.option("--challtestsrv", default="", metavar="URL", help="DNS-01 via pebble-challtestsrv")
@rfc2136_options("")
@click.option("--registration-host", default="0.0.0.0", show_default=True)
@click.option("--registration-port", type=int, default=0, help="0: no RegisterCvm endpoint")
@click.option("--url", default="", help="RegisterCvm URL advertised to CVMs")
@click.option("--tls-chain", type=click.Path(exists=True, dir_okay=False))
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--client-ca", type=click.Path(exists=True, dir_okay=False),
    help="the KMS root CA (GetMeta ca_cert): CVMs register with their KMS SignCert chain under "
    "it; KMS temp CAs are never trusted",
)  # fmt: skip
@click.option(
    "--kms-url", default="", metavar="URL",
    help="RegisterCvm's certificate from this KMS's SignCert as --gateway-app-id (what dstack "
    "guests check; TLS and the chain must end at --client-ca), instead of --tls-chain/--tls-key",
)  # fmt: skip
@click.option("--gateway-app-id", default="", metavar="HEX",
              help="with --kms-url: the gateway app (the KMS's gateway_app_id)")  # fmt: skip
@click.option(
    "--guest-agent", default="", metavar="SOCKET",
    help="with --kms-url: the dstack guest agent of the CVM this node runs in (its evidence)",
)  # fmt: skip
@click.option(
    "--log-auth/--no-log-auth", default=False, show_default=True,
    help="admit only a compose hash the app's own events on the log name (the KMS's log backend)",
)  # fmt: skip
@click.option(
    "--auth-webhook",
    default="",
    metavar="URL",
    help="ask this URL about each app (POST AppInfo JSON; 2xx allows, as dstack)",
)
@click.option("--dev-pki", type=click.Path(file_okay=False), help="trust simulated quotes (dev)")
@click.option("--pccs-url", default="", help="collateral from this PCCS [default: Intel's PCS]")
@click.option(
    "--forward-guard/--no-forward-guard", default=True, show_default=True,
    help="nftables: forward nothing into or out of the WireGuard interface (CVM to CVM)",
)  # fmt: skip
@click.option(
    "--wg-backend", type=click.Choice(["auto", "kernel", "userspace"]), default="auto",
    show_default=True, help="WireGuard: auto: the kernel's where a wireguard link can be made, "
    "else wireguard-go (status shows which, and why)",
)  # fmt: skip
@click.option(
    "--app-address-ns-prefix", default="_dstack-app-address", show_default=True,
    help="custom domains: the DNS TXT record naming <app_id>:<port> (dstack's)",
)  # fmt: skip
@click.option(
    "--app-address-ns-compat/--no-app-address-ns-compat", default=True, show_default=True,
    help="also look up dstack's legacy _tapp-address TXT record",
)  # fmt: skip
@click.option("--recycle-interval", type=float, default=300.0, show_default=True)
@click.option("--recycle-timeout", type=int, default=36_000, show_default=True)
@click.option("--poll-interval", type=float, default=0.05, show_default=True)
@click.option("--log-level", default="info", show_default=True)
def main(**o: Any) -> None:
    configure(level=o.pop("log_level"))
    chain, key = o.pop("cert_chain"), o.pop("cert_key")
    o["cert_pair"] = (Path(chain).read_bytes(), Path(key).read_bytes()) if chain and key else None
    o["tls"] = tuple(_read(o.pop(k)) for k in ("tls_chain", "tls_key", "client_ca"))
    o["kms_cert"] = _kms_cert(o)
    own = o["tls"][:2] if o["kms_cert"] is None else ("-", "-")
    if o["registration_port"] and not all((*own, o["tls"][2])):
        raise click.ClickException("--registration-port needs --client-ca and --tls-chain, "
                                   "--tls-key (or --kms-url)")  # fmt: skip
    if o["cluster_secret"] and o["cert_pair"]:
        raise click.ClickException(
            "--cluster-secret and --cert-chain/--cert-key exclude each other"
        )
    o["rfc2136"] = rfc2136_config(click.get_current_context(), "")
    acme_opts = (o["acme_directory"], o["acme_ca_bundle"], o["acme_contact"], o["challtestsrv"],
                 o["rfc2136"])  # fmt: skip
    if any(acme_opts) and not o["cluster_secret"]:
        raise click.ClickException("--acme-*, --challtestsrv and --rfc2136-* need --cluster-secret")
    if o["netns"]:
        # The whole process moves, so every device and socket below uses "this namespace"
        # (netns=None): pyroute2 switching namespaces per call would not bring this thread
        # back into NAME afterwards.
        enter_netns(o.pop("netns"))
    else:
        o.pop("netns")
    try:
        run_loop(run(**o))  # uvloop when installed: the proxy's data plane
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


def _kms_cert(o: dict[str, Any]) -> Any:
    """--kms-url/--gateway-app-id/--guest-agent: a `KmsAppCert`, or None without --kms-url."""
    from urllib.parse import urlsplit

    from pydstack.actors.kms.backends import BackendConfigError, gateway_app_id_option

    from .app_cert import KmsAppCert

    url, app, agent = (o.pop(k) for k in ("kms_url", "gateway_app_id", "guest_agent"))
    if not url:
        if app or agent:
            raise click.ClickException("--gateway-app-id and --guest-agent need --kms-url")
        return None
    if o["tls"][0] or o["tls"][1]:
        raise click.ClickException("--kms-url and --tls-chain/--tls-key exclude each other")
    if not (app and agent and o["tls"][2]):
        raise click.ClickException("--kms-url needs --gateway-app-id, --guest-agent (the node's "
                                   "evidence) and --client-ca (the KMS root)")  # fmt: skip
    try:
        app_id = bytes.fromhex(gateway_app_id_option(app))
    except BackendConfigError as e:
        raise click.ClickException(str(e)) from None
    # the names dstack's gateway asks for: its RPC domain and its own URL's host
    names = [n for n in (urlsplit(o["url"]).hostname, o["registration_host"]) if n]
    names = [n for n in dict.fromkeys(names) if n not in ("0.0.0.0", "::")]
    return KmsAppCert(kms_url=url, kms_root_pem=o["tls"][2], app_id=app_id,
                      alt_names=tuple(names), guest_agent=agent)  # fmt: skip


async def run(**o: Any) -> None:
    from pydstack.adapters.nats import EventStore, StoreError, StreamSettings
    from pydstack.adapters.nats.identity import standalone_identity
    from pydstack.adapters.proxy import StaticCertProvider
    from pydstack.adapters.wireguard import WireGuardError

    from .node import NodeConfig
    from .node_launch import NodeLaunch, RegistrationLaunch, running_node
    from .recycler import RecycleConfig

    try:
        signer, seed, anchor = standalone_identity(
            o["creds"], o["identity"], "gateway", o["keyring"], "--creds"
        )
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    certs: Any = None
    if o["cert_pair"] is not None:
        certs = StaticCertProvider({o["base_domain"]: o["cert_pair"]})
    registration = None
    if o["registration_port"]:
        chain, key, ca = (t or "" for t in o["tls"])
        registration = RegistrationLaunch(
            chain, key, ca, host=o["registration_host"], port=o["registration_port"],
            kms_cert=o["kms_cert"],
            dev_pki=o["dev_pki"], pccs_url=o["pccs_url"] or None, log_auth=o["log_auth"],
            auth_webhook=o["auth_webhook"] or None,
        )  # fmt: skip
    config = NodeConfig(
        node_id=o["node_id"], base_domain=o["base_domain"], endpoint=o["endpoint"],
        cluster=o["cluster"], url=o["url"], listen_port=o["listen_port"],
        tunnel_ip=o["tunnel_ip"], tunnel_net=o["tunnel_net"], poll_interval_s=o["poll_interval"],
        recycle=RecycleConfig(interval_s=o["recycle_interval"], timeout_s=o["recycle_timeout"]),
    )  # fmt: skip
    launch = NodeLaunch(
        node=config, state_dir=Path(o["state_dir"]), ifname=o["ifname"],
        proxy_host=o["proxy_host"], proxy_port=o["proxy_port"], certs=certs,
        acme=_acme(o), admin_host=o["admin_host"], admin_port=o["admin_port"],
        registration=registration, address_plan=o["address_plan"],
        forward_guard=o["forward_guard"], wg_backend=o["wg_backend"],
        app_address_ns_prefix=o["app_address_ns_prefix"],
        app_address_ns_compat=o["app_address_ns_compat"],
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        store = await EventStore.connect(
            o["nats_url"], signer, nkey_seed=seed, settings=StreamSettings(name=o["stream"]),
            name=f"pydstack-gateway-{o['node_id']}", anchor=anchor,
        )  # fmt: skip
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(store.close)
            rn = await stack.enter_async_context(running_node(store, launch))
            ready = {"node_id": o["node_id"], "proxy_port": rn.proxy_port,
                     "admin_url": rn.admin_url, "registration_url": rn.registration_url,
                     "tunnel_ip": rn.node.tunnel_ip, "pid": os.getpid()}  # fmt: skip
            gc.freeze()  # start-up objects leave the cyclic GC: cheap gen-2 collections
            print("GATEWAY_READY " + json.dumps(ready), flush=True)
            await stop.wait()
    except (StoreError, WireGuardError) as exc:
        raise click.ClickException(str(exc)) from None


def _acme(o: dict[str, Any]) -> Any:
    """The node's AcmeLaunch, or None without ``--cluster-secret``."""
    if not o["cluster_secret"]:
        return None
    from pydstack.adapters.acme import load_cluster_key

    from .dns_providers import dns_providers
    from .node_launch import AcmeLaunch

    dns = dns_providers(o["challtestsrv"], o["rfc2136"])
    return AcmeLaunch(
        cluster_key=load_cluster_key(Path(o["cluster_secret"]), o["cluster"]),
        directory=o["acme_directory"], dns=dns, ca_bundle=o["acme_ca_bundle"],
        contact=tuple(o["acme_contact"]),
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
