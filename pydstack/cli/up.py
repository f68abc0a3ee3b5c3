"""``pydstack up``: run the control plane here (embedded nats-server) or join a NATS cluster."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import click
import structlog
from click.core import ParameterSource

from pydstack.actors.gateway.dns_providers import rfc2136_config, rfc2136_options
from pydstack.adapters.nats import StoreError
from pydstack.adapters.nats.bundle import is_bundle, read_bundle
from pydstack.adapters.registry import LocalRegistry, RegistryError
from pydstack.controlplane import ControlPlane, DataDir, UpOptions, default_host_id
from pydstack.logs import configure
from pydstack.loop import run as run_loop

from ._common import Settings, connection_options

_log = structlog.get_logger("pydstack.up")


def _kms_urls(urls: tuple[str, ...]) -> tuple[str, ...]:
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise click.BadParameter(f"{url!r} is not an https:// URL", param_hint="--kms-url")
    return urls


def _mirror_urls(urls: tuple[str, ...]) -> tuple[str, ...]:
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
            raise click.BadParameter(f"{url!r} is not http(s)://HOST[:PORT]",
                                     param_hint="--registry-mirror")  # fmt: skip
    return urls


async def _with_registry(data: DataDir, opts: UpOptions, port: int) -> int:
    """The control plane with `up --registry`'s local registry in front of its mirrors."""
    async with LocalRegistry.start(data.path / "registry", port) as reg:
        _log.info("local registry", url=reg.url, storage=str(reg.storage))
        mirrors = (reg.url, *opts.registry_mirrors)
        plane = ControlPlane(data, replace(opts, registry_url=reg.url, registry_mirrors=mirrors))
        return await plane.run()


def _dashboard_hosts(names: tuple[str, ...]) -> tuple[str, ...]:
    from pydstack.actors.dashboard import GuardError, parse_host

    for name in names:
        try:
            parse_host(name)
        except GuardError as exc:
            raise click.BadParameter(str(exc), param_hint="--dashboard-host") from None
    return names


def _loopback_unless_allowed(data: DataDir, opts: UpOptions, allow: bool) -> None:
    """Simulated attestation serves loopback clients only (``up_listeners``): refused before
    anything starts or is appended, unless ``--allow-simulated``; then said loudly."""
    from .up_listeners import is_loopback, refusal, simulated_reason, tsm_report_present
    from .up_listeners import up_listeners as listeners

    reason = simulated_reason(tsm_report=tsm_report_present(), vmm_backend=opts.vmm_backend,
                              vmm_platform=opts.vmm_platform)  # fmt: skip
    if not reason:
        return
    try:
        cfg = data.load_config()  # the listen address a former `up --listen` left there
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    embedded = not (opts.nats_url or cfg.nats_url)
    exposed = [x for x in listeners(opts, nats_host=opts.host or cfg.host, embedded=embedded)
               if not is_loopback(x.address)]  # fmt: skip
    if not exposed:
        return
    if not allow:
        raise click.ClickException(refusal(exposed, reason))
    _log.warning(
        "--allow-simulated: SIMULATED ATTESTATION SERVED BEYOND LOOPBACK; clients on other "
        "machines get no confidentiality and attestation proves nothing to them",
        simulated=reason,
        listeners=[f"{x.serves} on {x.address or '0.0.0.0'} ({x.option})" for x in exposed],
    )


@click.command("up")
@connection_options
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="client port of the embedded nats-server [default: as last time, else 4222]",
)
@click.option(
    "--listen",
    "host",
    metavar="ADDR",
    default=None,
    help="address nats-server listens on [default: 127.0.0.1]",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(-1, 65535),
    default=0,
    show_default=True,
    help="Prometheus /metrics port (0: any free port, -1: off)",
)
@click.option(
    "--dashboard-port",
    type=click.IntRange(-1, 65535),
    default=8080,
    show_default=True,
    help="web dashboard port (taken or 0: any free port, -1: off)",
)
@click.option(
    "--dashboard-listen",
    metavar="ADDR",
    default="127.0.0.1",
    show_default=True,
    help="address the dashboard listens on; not loopback: every request needs its login "
    "token (state.json: dashboard_login_token_file)",
)
@click.option(
    "--dashboard-host",
    "dashboard_hosts",
    multiple=True,
    metavar="NAME[:PORT]",
    callback=lambda _c, _p, names: _dashboard_hosts(names),
    help="a further name browsers reach the dashboard by, e.g. a reverse proxy's (repeatable; "
    "any other Host header is refused)",
)
@click.option(
    "--dashboard-kms",
    metavar="URL",
    default="",
    help="KMS the deploy form gets env keys from [default: up's own; --no-kms: a dev key]",
)
@click.option(
    "--host-id",
    default=default_host_id(),
    show_default=True,
    help="join this machine as a VM host under this id",
)
@click.option("--no-host", is_flag=True, help="do not join this machine as a VM host")
@click.option("--host-vcpu", type=click.IntRange(1), default=20, show_default=True)
@click.option("--host-memory-mb", type=click.IntRange(1), default=100 * 1024, show_default=True)
@click.option(
    "--reconcile-interval",
    type=click.FloatRange(0.1),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
)
@click.option(
    "--allow-delete",
    is_flag=True,
    hidden=True,
    help="create the stream without deny_delete (tamper tests only)",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--log-json/--log-console",
    default=None,
    help="log format [default: JSON unless stderr is a terminal]",
)
@click.option(
    "--kms/--no-kms",
    default=None,
    help="run a KMS instance [default: with the embedded server, not when joining --nats]",
)
@click.option("--kms-port", type=click.IntRange(0, 65535), default=0, help="[default: 9100]")
@click.option(
    "--kms-workers",
    type=click.IntRange(1, 256),
    default=1,
    help="serve the KMS from this many processes on its port (boot storms; one per core "
    "scales with the cores); 1: inside up",
)
@click.option(
    "--kms-auth",
    type=click.Choice(["log", "webhook", "eth", "dev"]),
    default=None,
    help="authorization backend [default: log: an app gets keys only for a compose its own "
    "AppRegistered/AppUpgraded events name; eth: a DstackKms contract (dstack's ABI); dev "
    "(every attested app) only when asked]",
)
@click.option("--kms-auth-url", default="", help="auth-simple webhook for --kms-auth webhook")
@click.option(
    "--eth-rpc-url",
    default="",
    metavar="URL",
    envvar="PYDSTACK_ETH_RPC_URL",
    help="--kms-auth eth: the chain's JSON-RPC endpoint [env PYDSTACK_ETH_RPC_URL: keeps a "
    "provider's API key off the command line]",
)
@click.option(
    "--kms-contract",
    default="",
    metavar="ADDR",
    help="--kms-auth eth: the DstackKms contract (`pydstack kms contract deploy`, or dstack's)",
)
@click.option(
    "--vmm",
    "vmm_backend",
    type=click.Choice(["none", "sandbox", "qemu"]),
    default="none",
    show_default=True,
    help="run this host's VMM with that CVM backend (its API: the unix socket in state.json's "
    "vmm_url)",
)
@click.option(
    "--platform",
    "vmm_platform",
    type=click.Choice(["auto", "tdx", "kvm", "tcg"]),
    default="auto",
    show_default=True,
    help="--vmm qemu: where CVMs run: tdx (KVM reports TDX and QEMU has tdx-guest), kvm (a "
    "probe guest boots under KVM), tcg (software, no TEE); auto: the first of these the host "
    "has; one that it lacks is refused, naming what is missing",
)
@click.option(
    "--vmm-api-port",
    type=click.IntRange(-1, 65535),
    default=-1,
    help="also serve the VMM API on this TCP port (0: any), on --listen's address; clients need "
    "the token in state.json's vmm_token_file [default: unix socket only]",
)
@click.option(
    "--allow-public-ports",
    is_flag=True,
    help="let CVM ports be forwarded from non-loopback host addresses (e.g. 0.0.0.0) "
    "[default: loopback only]",
)
@click.option(
    "--allow-simulated",
    is_flag=True,
    help="let a host with simulated attestation (no TDX) listen on non-loopback addresses "
    "(--listen, --gateway-listen, --dashboard-listen, --allow-public-ports); without it they "
    "are refused, so no fleet serves simulated TDX by accident [development only]",
)
@click.option(
    "--gateway/--no-gateway",
    default=None,
    help="run a gateway node [default: with the KMS, where wireguard-go can run]",
)
@click.option("--gateway-domain", default="gw.localhost", show_default=True, metavar="DOMAIN")
@click.option("--gateway-port", type=click.IntRange(0, 65535), default=0, help="[default: 8443]")
@click.option("--gateway-listen", default="", metavar="ADDR", help="[default: as --listen]")
@click.option(
    "--gateway-acme-directory",
    default="",
    metavar="URL",
    help="serve ACME certificates from this CA (via the log) [default: a dev CA, offline]",
)
@click.option(
    "--gateway-acme-ca-bundle",
    default="",
    type=click.Path(dir_okay=False),
    help="CA of the ACME server's HTTPS",
)
@click.option("--gateway-challtestsrv", default="", metavar="URL", help="DNS-01 provider")
@rfc2136_options("gateway-")
@click.option(
    "--gateway-forward-guard/--no-gateway-forward-guard",
    default=True,
    show_default=True,
    help="nftables table in the host's ruleset: nothing is forwarded into or out of the "
    "gateway's WireGuard interface, so CVMs cannot reach each other through it",
)
@click.option(
    "--gateway-node-id",
    default="gw1",
    show_default=True,
    help="this gateway node's id in the gateway cluster (one per host)",
)
@click.option(
    "--join",
    default="",
    metavar="BUNDLE|URL",
    help="join as a further host with the join bundle `pydstack host add NAME` wrote (this "
    "host's own keys only; host id, NATS URLs and KMS URLs from the bundle), or join this NATS "
    "server or cluster with the data dir's identities (same as --nats URL)",
)
@click.option(
    "--kms-onboard",
    default="",
    metavar="URL",
    help="a running KMS of the cluster to get the root keys from (a replica's first start)",
)
@click.option(
    "--kms-onboard-token-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="with --kms-onboard: the source's onboarding token (its DATA_DIR/kms/onboard-token, "
    "copied here 0600), sent inside the mutual RA-TLS channel: a dev-backend KMS releases "
    "its root keys to no replica without it (or --kms-allow-mr on the source)",
)
@click.option(
    "--kms-allow-mr",
    "kms_allow_mrs",
    multiple=True,
    metavar="HEX",
    help="dev backend: a KMS measurement allowed to hold the root keys without the token "
    "(replicas onboarding from this KMS, and the source this one onboards from): MRTD "
    "(96 hex digits; names the firmware only) or mr_aggregated / mr_system (64); repeatable",
)
@click.option(
    "--kms-url",
    "kms_urls",
    multiple=True,
    metavar="URL",
    callback=lambda _c, _p, urls: _kms_urls(urls),
    help="a further KMS replica this host's CVMs may ask, after up's own KMS (repeatable, "
    "in order)",
)
@click.option(
    "--registry",
    "local_registry",
    is_flag=True,
    help="run a local image registry (Debian's docker-registry, DATA_DIR/registry, on "
    "loopback): every CVM's engine uses it as its registry mirror and guests may reach it; "
    "fill it with `pydstack image push` (images pinned by digest are checked whoever serves)",
)
@click.option(
    "--registry-port",
    type=click.IntRange(0, 65535),
    default=0,
    help="--registry's port [default: any free port; state.json: registry_url]",
)
@click.option(
    "--registry-mirror",
    "registry_mirrors",
    multiple=True,
    metavar="URL",
    callback=lambda _c, _p, urls: _mirror_urls(urls),
    help="a further registry mirror of this host's CVM engines, after --registry's "
    "(http(s)://HOST:PORT; repeatable)",
)
@click.pass_context
def up_cmd(
    ctx: click.Context,
    port: int | None,
    host: str | None,
    metrics_port: int,
    dashboard_port: int,
    dashboard_kms: str,
    dashboard_listen: str,
    dashboard_hosts: tuple[str, ...],
    host_id: str,
    no_host: bool,
    host_vcpu: int,
    host_memory_mb: int,
    reconcile_interval: float,
    allow_delete: bool,
    log_level: str,
    log_json: bool | None,
    kms: bool | None,
    kms_port: int,
    kms_workers: int,
    kms_auth: str | None,
    kms_auth_url: str,
    eth_rpc_url: str,
    kms_contract: str,
    vmm_backend: str,
    vmm_platform: str,
    vmm_api_port: int,
    allow_public_ports: bool,
    allow_simulated: bool,
    gateway: bool | None,
    gateway_domain: str,
    gateway_port: int,
    gateway_listen: str,
    gateway_acme_directory: str,
    gateway_acme_ca_bundle: str,
    gateway_challtestsrv: str,
    gateway_forward_guard: bool,
    gateway_node_id: str,
    join: str,
    kms_onboard: str,
    kms_onboard_token_file: str | None,
    kms_allow_mrs: tuple[str, ...],
    kms_urls: tuple[str, ...],
    local_registry: bool,
    registry_port: int,
    registry_mirrors: tuple[str, ...],
) -> None:
    """Start the control plane: nats-server + JetStream, the stream, the actors.

    With no NATS URL configured it runs its own nats-server in the data dir (a second `up`
    reuses it). With --nats URL (or PYDSTACK_NATS, or nats_url in DATA_DIR/config.json) it
    joins that server or cluster instead, using the identities of the data dir (on a
    further host: `--join URL`, with `--kms --kms-onboard URL` for a KMS replica; a KMS
    replica alone: `--no-host --no-gateway --kms --kms-onboard URL --host-id NAME`, NAME being
    its instance id, and `--kms-onboard-token-file FILE` the source's onboarding token when
    its backend is dev). `--kms-url URL` names further KMS replicas this host's CVMs may ask.
    Stop with Ctrl-C: actors first, then nats-server.
    """
    s = ctx.ensure_object(Settings)
    configure(level=log_level, json=log_json)
    if vmm_platform != "auto":  # refused before anything starts (one line: what is missing)
        from pydstack.actors.vmm import resolve_platform

        try:
            resolve_platform("" if vmm_backend == "none" else vmm_backend, vmm_platform)
        except StoreError as exc:
            raise click.ClickException(str(exc)) from None
    # --host-id also names the KMS instance; with --no-host only when given (a replica alone)
    named = ctx.get_parameter_source("host_id") not in (None, ParameterSource.DEFAULT)
    bundle = ""
    if join and is_bundle(join):
        try:
            b = read_bundle(Path(join))
        except StoreError as exc:
            raise click.ClickException(str(exc)) from None
        bundle, join = join, ",".join(b.nats_urls)
        host_id = host_id if named else b.host
        kms_urls = kms_urls or b.kms_urls
    gateway_rfc2136 = rfc2136_config(ctx, "gateway-")  # the TSIG secret file read and checked
    if gateway_rfc2136 is not None and not gateway_acme_directory:
        raise click.UsageError("--gateway-rfc2136-* needs --gateway-acme-directory")
    opts = UpOptions(
        join_bundle=bundle,
        port=port, host=host, nats_url=join or s.nats, stream=s.stream, allow_delete=allow_delete,
        metrics_port=metrics_port, host_id=None if no_host else host_id, host_vcpu=host_vcpu,
        host_memory_mb=host_memory_mb, reconcile_interval_s=reconcile_interval, kms=kms,
        kms_port=kms_port, kms_workers=kms_workers, kms_auth=kms_auth or "",
        kms_auth_url=kms_auth_url,
        kms_eth_rpc_url=eth_rpc_url, kms_contract=kms_contract,
        kms_onboard=kms_onboard, kms_onboard_token_file=kms_onboard_token_file or "",
        kms_allow_mrs=kms_allow_mrs, kms_urls=kms_urls,
        kms_instance=host_id if no_host and (named or bundle) else "",
        gateway_node_id=gateway_node_id,
        dashboard_port=dashboard_port, dashboard_kms=dashboard_kms,
        dashboard_listen=dashboard_listen, dashboard_hosts=dashboard_hosts,
        vmm_backend="" if vmm_backend == "none" else vmm_backend, vmm_api_port=vmm_api_port,
        vmm_platform=vmm_platform,
        allow_public_ports=allow_public_ports, gateway=gateway, gateway_domain=gateway_domain,
        gateway_port=gateway_port,
        gateway_listen=gateway_listen, gateway_acme_directory=gateway_acme_directory,
        gateway_acme_ca_bundle=gateway_acme_ca_bundle, gateway_challtestsrv=gateway_challtestsrv,
        gateway_rfc2136=gateway_rfc2136,
        gateway_forward_guard=gateway_forward_guard, registry_mirrors=registry_mirrors,
    )  # fmt: skip
    data = DataDir.resolve(s.data_dir)
    _loopback_unless_allowed(data, opts, allow_simulated)
    try:  # uvloop when installed: the gateway node's proxy
        code = run_loop(_with_registry(data, opts, registry_port) if local_registry else
                        ControlPlane(data, opts).run())  # fmt: skip
    except (StoreError, ValueError, RegistryError) as exc:  # ValueError: bad KMS options
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        raise SystemExit(130) from None
    ctx.exit(code)
