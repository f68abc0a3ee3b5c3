"""`pydstack attest`: verify quotes / RA-TLS certificates, run a simulated guest agent.

    pydstack attest verify quote.bin --collateral coll.json --event-log log.json --now 1751000000
    pydstack attest verify cert.pem --collateral coll.json --dev-root sim/root.der --json
    pydstack attest simulate --state ./sim --socket /tmp/dstack.sock

`verify` exits 0 only when the quote is trusted under the default policy and the event log
(given, or embedded in the certificate / attestation / GetQuote JSON) replays to it.
Registered by `pydstack.cli.main` with `main.add_command(attest)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pydstack.adapters.tdx.attestation import Attestation, decode_attestation
from pydstack.adapters.tdx.collateral import (
    Collateral,
    collateral_from_json,
    fetch_collateral,
    load_collateral,
)
from pydstack.adapters.tdx.errors import TdxError
from pydstack.adapters.tdx.eventlog import (
    EventLogError,
    TdxEvent,
    parse_json_event_log,
    replay_and_compare,
    runtime_events_of,
)
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.quote import Quote
from pydstack.adapters.tdx.ratls import binding_reasons, check_attestation, extract_attestation
from pydstack.core.events import ImageRegistered
from pydstack.core.measure import ImageParts, VmShape

DEFAULT_PCCS = "https://pccs.phala.network"


class _Evidence:
    """What the input file held: a quote, maybe a log, maybe a certificate key to bind."""

    def __init__(self, quote: bytes, events: list[TdxEvent] | None, config: str = "") -> None:
        self.quote = quote
        self.events = events
        self.config = config
        self.spki: bytes | None = None
        self.attestation: Attestation | None = None


def _load_input(data: bytes) -> _Evidence:
    text = data.strip()
    if text.startswith(b"-----BEGIN CERTIFICATE-----"):
        cert = x509.load_pem_x509_certificate(data)
        att = extract_attestation(cert)
        ev = _Evidence(att.quote, list(att.event_log), att.config)
        ev.spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ev.attestation = att
        return ev
    if text.startswith(b"{"):  # GetQuote answer or dstack's quote-report.json
        obj = json.loads(text)
        log = obj.get("event_log")
        events = parse_json_event_log(log) if log else None
        return _Evidence(bytes.fromhex(obj["quote"]), events, obj.get("vm_config", ""))
    if data[:1] == b"\x00":  # SCALE V0 attestation (dstack /Attest)
        att = decode_attestation(data)
        ev = _Evidence(att.quote, list(att.event_log), att.config)
        ev.attestation = att
        return ev
    try:
        return _Evidence(bytes.fromhex(text.decode("ascii").removeprefix("0x")), None)
    except (UnicodeDecodeError, ValueError):
        return _Evidence(data, None)


def _measurements(q: Quote) -> dict[str, str]:
    r = q.report
    return {
        "mr_td": r.mr_td.hex(),
        "rtmr0": r.rtmr0.hex(),
        "rtmr1": r.rtmr1.hex(),
        "rtmr2": r.rtmr2.hex(),
        "rtmr3": r.rtmr3.hex(),
        "mr_config_id": r.mr_config_id.hex(),
        "report_data": r.report_data.hex(),
        "td_attributes": r.td_attributes.hex(),
    }


def _dev_pki_of(root_path: str) -> DevPki | None:
    """The simulator PKI whose root ``root_path`` is (``up``: DATA/dev-pki/root.der), so a
    simulated quote verifies without a collateral file: the PKI signs one as of ``now``."""
    try:
        return DevPki.load(Path(root_path).parent)
    except (TdxError, OSError, ValueError):
        return None


def _read_root(path: str | None) -> bytes | None:
    if path is None:
        return None
    raw = Path(path).read_bytes()
    if raw.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(raw).public_bytes(serialization.Encoding.DER)
    return raw


def verify_evidence(
    ev: _Evidence, collateral: Collateral, now: int, root_der: bytes | None
) -> dict[str, Any]:
    """The report `verify` prints; `trusted` is the exit decision."""
    events = ev.events
    runtime = tuple(runtime_events_of(events or []))
    att = ev.attestation or Attestation(
        quote=ev.quote,
        event_log=tuple(events or ()),
        runtime_events=runtime,
        report_data=ev.quote[568:632].ljust(64, b"\x00"),
        config=ev.config,
    )
    reasons, status, quote, info = check_attestation(att, collateral, now=now, root_ca_der=root_der)
    if events is None:
        # Without a log only the quote is judged; RTMR3/app identity cannot be replayed.
        reasons = [r for r in reasons if "runtime_events" not in r and "RTMR" not in r]
        info = None
    if ev.spki is not None and quote is not None:
        reasons = binding_reasons(ev.spki, att, quote) + reasons
    replays = False
    if events is not None and quote is not None:
        try:
            replays = replay_and_compare(events, quote.report.rtmrs).ok
        except EventLogError:
            replays = False
    return {
        "trusted": not reasons,
        "verdict": "trusted" if not reasons else "refused",
        "reasons": reasons,
        "tcb_status": status,
        "event_log": None
        if events is None
        else {
            "events": len(events),
            "replays": replays,
        },
        "measurements": _measurements(quote) if quote else None,
        "app": info.to_json_obj() if info else None,
    }


@click.group()
def attest() -> None:
    """TDX attestation: verify evidence, simulate a guest."""


@attest.command()
@click.argument("quote_or_cert", type=click.Path(exists=True, dir_okay=False))
@click.option("--collateral", type=click.Path(exists=True, dir_okay=False), help="JSON file")
@click.option("--event-log", type=click.Path(exists=True, dir_okay=False), help="dstack JSON")
@click.option("--now", type=int, default=None, help="verify as of this unix time")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--dev-root", type=click.Path(exists=True, dir_okay=False),
              help="trust a dev root; in a simulator PKI dir (up: DATA/dev-pki/root.der) and "
                   "without --collateral, collateral is signed by that PKI")  # fmt: skip
@click.option("--pccs-url", default=DEFAULT_PCCS, show_default=True)
def verify(
    quote_or_cert: str,
    collateral: str | None,
    event_log: str | None,
    now: int | None,
    as_json: bool,
    dev_root: str | None,
    pccs_url: str,
) -> None:
    """Verify a quote (raw/hex), GetQuote JSON, SCALE attestation or RA-TLS cert (PEM)."""
    try:
        ev = _load_input(Path(quote_or_cert).read_bytes())
        if event_log is not None:
            ev.events = parse_json_event_log(Path(event_log).read_bytes())
            ev.attestation = None
        at = int(time.time()) if now is None else now
        if collateral:
            coll = load_collateral(collateral)
        elif dev_root and (dev := _dev_pki_of(dev_root)) is not None:
            coll = collateral_from_json(dev.collateral_json(now=at))  # its own TCB signer
        else:
            coll = asyncio.run(fetch_collateral(pccs_url, ev.quote))
        report = verify_evidence(ev, coll, at, _read_root(dev_root))
    except (TdxError, ValueError, KeyError, OSError) as e:
        raise click.ClickException(f"cannot verify {quote_or_cert}: {e}") from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"verdict: {report['verdict']}")
        click.echo(f"tcb status: {report['tcb_status'] or '-'}")
        for r in report["reasons"]:
            click.echo(f"  reason: {r}")
        if report["event_log"] is not None:
            log = report["event_log"]
            click.echo(f"event log: {log['events']} events, replays: {log['replays']}")
        for k, v in (report["measurements"] or {}).items():
            click.echo(f"{k}: {v}")
        for k, v in (report["app"] or {}).items():
            click.echo(f"app.{k}: {v}")
    sys.exit(0 if report["trusted"] else 1)


@attest.command()
@click.option(
    "--state",
    "state_dir",
    default="./pydstack-sim",
    show_default=True,
    help="dev PKI, app keys and collateral are kept here",
)
@click.option("--socket", "sock", default="/var/run/dstack.sock", show_default=True)
@click.option("--tappd-socket", default=None, help="also serve the legacy tappd API")
@click.option("--app-id", default=None, help="hex, 20 bytes (random when new)")
@click.option("--compose", "compose_file", type=click.Path(exists=True), default=None)
@click.option(
    "--kms",
    "kms_url",
    default=None,
    help="get the app keys from this KMS over RA-TLS (e.g. the one `pydstack up` runs)",
)
@click.option(
    "--dev-pki",
    "dev_pki",
    type=click.Path(file_okay=False),
    default=None,
    help="simulator PKI to sign quotes with (a KMS must trust it; `up` keeps one in DATA/dev-pki)",
)
@click.option(
    "--gateway",
    "gateway_url",
    default=None,
    metavar="URL",
    help="register with this gateway (RegisterCvm over RA-TLS) and bring up WireGuard",
)
@click.option(
    "--gateway-ca",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="CA of the gateway's certificate (`up`: DATA/gateway/ca.pem)",
)
@click.option("--gateway-netns", default=None, help="existing netns for the CVM's WireGuard")
@click.option("--instance-id", "instance_hex", default=None, help="hex, 20 bytes [random]")
@click.option("--image", "image_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="image directory the TD is measured as (a KMS serves only images "
                   "registered on its log: `up`'s are DATA/vmm/images/*) [a built-in "
                   "unregistered one]")  # fmt: skip
@click.option("--vcpu", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="the VM shape the TD is measured in")  # fmt: skip
@click.option("--memory", "memory_mb", type=click.IntRange(16, 1 << 26), default=1024,
              show_default=True, help="MiB, the VM shape the TD is measured in")  # fmt: skip
def simulate(
    state_dir: str,
    sock: str,
    tappd_socket: str | None,
    app_id: str | None,
    compose_file: str | None,
    kms_url: str | None,
    dev_pki: str | None,
    gateway_url: str | None,
    gateway_ca: str | None,
    gateway_netns: str | None,
    instance_hex: str | None,
    image_dir: str | None,
    vcpu: int,
    memory_mb: int,
) -> None:
    """Run a guest agent on the TDX simulator (verify with --dev-root STATE/pki/root.der)."""
    if gateway_url and not gateway_ca:
        raise click.UsageError("--gateway needs --gateway-ca")
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    image = _sim_image(Path(image_dir) if image_dir else None)
    asyncio.run(
        _simulate(
            Path(state_dir),
            sock,
            tappd_socket,
            app_id,
            compose_file,
            kms_url,
            Path(dev_pki) if dev_pki else None,
            (gateway_url, _read_text(gateway_ca or ""), gateway_netns) if gateway_url else None,
            instance_hex,
            (image, VmShape(cpu_count=vcpu, memory_size=memory_mb << 20)),
        )
    )


def _sim_image(path: Path | None) -> ImageRegistered:
    """The image a simulated TD is measured as: `path`'s registration, else a built-in one."""
    from pydstack.actors.image_registry import ImageRegistryError, image_registration

    if path is not None:
        try:
            return image_registration(path)
        except ImageRegistryError as e:
            raise click.ClickException(str(e)) from None
    sums = f"{hashlib.sha256(b'pydstack simulated rootfs').hexdigest()}  rootfs\n"
    return ImageRegistered(
        os_image_hash=hashlib.sha256(sums.encode()).hexdigest(), name="pydstack-simulated",
        sha256sum=sums, firmware=hashlib.sha384(b"pydstack simulated TDVF").hexdigest(),
        kernel=hashlib.sha384(b"pydstack simulated kernel").hexdigest(),
        initrd=hashlib.sha384(b"pydstack simulated initrd").hexdigest(),
    )  # fmt: skip


def _read_text(path: str) -> str:
    return Path(path).read_text()


async def _simulate(
    state: Path,
    sock: str,
    tappd: str | None,
    app_id_hex: str | None,
    compose_file: str | None,
    kms_url: str | None = None,
    dev_pki: Path | None = None,
    gateway: tuple[str, str, str | None] | None = None,
    instance_hex: str | None = None,
    measured: tuple[ImageRegistered, VmShape] | None = None,
) -> None:
    from pydstack.adapters.secretfile import write_secret
    from pydstack.adapters.tdx.backend import measured_simulator
    from pydstack.adapters.tdx.identity import mr_config_id_v1
    from pydstack.adapters.tdx.pki import DevPki
    from pydstack.adapters.tdx.simulator import QuoteSimulator
    from pydstack_guest import (
        GuestAgent,
        GuestConfig,
        LocalKeyProvider,
        boot_runtime_events,
        create_dev_app_keys,
        measure_after_keys,
        measure_identity,
        serve_agent,
    )
    from pydstack_guest.kms_provider import KmsKeyProvider
    from pydstack_guest.kms_trust import KmsTrust

    now = int(time.time())
    pki_dir = dev_pki or state / "pki"
    pki = DevPki.load(pki_dir) if (pki_dir / "root.der").exists() else DevPki.generate()
    pki.save(pki_dir)
    # Collateral valid 30 days from now, for `attest verify --collateral`.
    (state / "collateral.json").write_text(pki.collateral_json(now))
    compose = _read_text(compose_file) if compose_file else '{"name":"sim"}'
    # dstack's rule: the app id is the compose hash's first 20 bytes unless given.
    app_id = (
        bytes.fromhex(app_id_hex) if app_id_hex else hashlib.sha256(compose.encode()).digest()[:20]
    )
    keys_path = state / "appkeys.json"
    if kms_url is None and not keys_path.exists():
        _, text = create_dev_app_keys(app_id, now=now)
        write_secret(keys_path, text)
    image, shape = measured or (_sim_image(None), VmShape(cpu_count=1, memory_size=1 << 30))
    os_image_hash = bytes.fromhex(image.os_image_hash)
    parts = ImageParts(firmware=image.firmware, kernel=image.kernel, initrd=image.initrd,
                       cmdline=image.cmdline)  # fmt: skip
    config_id = mr_config_id_v1(hashlib.sha256(compose.encode()).digest())
    backend = measured_simulator(QuoteSimulator(pki), parts, shape, mr_config_id=config_id)
    vm_config = json.dumps({"os_image_hash": image.os_image_hash, "cpu_count": shape.cpu_count,
                            "memory_size": shape.memory_size})  # fmt: skip
    instance_id = bytes.fromhex(instance_hex) if instance_hex else os.urandom(20)
    if kms_url is None:
        keys = await LocalKeyProvider(keys_path).app_keys()
        await boot_runtime_events(
            backend, keys, app_id=app_id, app_compose=compose, instance_id=instance_id,
            os_image_hash=os_image_hash,
        )  # fmt: skip
    else:
        # dstack's order: identity measured, then keys from the KMS, then the rest.
        await measure_identity(backend, app_id=app_id, app_compose=compose, instance_id=instance_id)
        # The KMS of `up` is attested by the same dev PKI: its checks run as a CVM's would.
        provider = KmsKeyProvider(kms_url, backend, trust=KmsTrust.dev(pki), app_id=app_id,
                                  vm_config=vm_config)  # fmt: skip
        keys = await provider.app_keys()
        await measure_after_keys(backend, keys, os_image_hash=os_image_hash)
        click.echo(f"app keys from {kms_url} for app {app_id.hex()}", err=True)
    agent = GuestAgent(
        backend,
        keys,
        GuestConfig(
            app_name="sim",
            app_compose=compose,
            vm_config=vm_config,
        ),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with (
        serve_agent(agent, dstack_sock=sock, tappd_sock=tappd),
        _gateway(agent, state, gateway),
    ):
        click.echo(
            f"guest agent (simulated TDX) on {sock}; dev root: {pki_dir / 'root.der'}; "
            f"collateral: {state / 'collateral.json'}",
            err=True,
        )
        await stop.wait()


@contextlib.asynccontextmanager
async def _gateway(
    agent: Any, state: Path, gateway: tuple[str, str, str | None] | None
) -> AsyncIterator[None]:
    """Register the simulated CVM with a gateway and keep its WireGuard tunnel up."""
    if gateway is None:
        yield
        return
    from pydstack.adapters.wireguard import PrivateKey, UserspaceBackend
    from pydstack_guest.gateway_client import bring_up_tunnel, register_cvm

    url, ca_pem, netns = gateway
    key = PrivateKey.generate()
    tls = await agent.tls_key(
        agent.fresh_tls_key(), subject="pydstack-cvm", alt_names=(), usage_ra_tls=True,
        usage_server_auth=False, usage_client_auth=True,
    )  # fmt: skip
    identity = ("".join(tls["certificate_chain"]), tls["key"])
    reg = await register_cvm(url, identity=identity, ca_pem=ca_pem,
                             wg_public_key=key.public_key().b64)  # fmt: skip
    backend = UserspaceBackend(state / "wg")
    async with await bring_up_tunnel(backend, "wg0", key, reg, netns=netns):
        info = agent.app_info(await agent.attestation(b""))
        click.echo(
            f"registered with {url}: tunnel ip {reg.client_ip}, {len(reg.servers)} gateway(s); "
            f"app https://{info.app_id.hex()}.{reg.domain}, "
            f"instance https://{info.instance_id.hex()}.{reg.domain}",
            err=True,
        )
        yield
