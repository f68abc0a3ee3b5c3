"""Start one KMS instance from plain options: used by `python -m pydstack.actors.kms` and by
`pydstack up`.

    async with running_kms(store, KmsLaunch(cluster="main", key_file=..., ...)) as url:
        ...

On a TDX host the seal key and attestation come from the dstack guest agent (`guest_agent`);
on a dev machine a simulator PKI (`dev_pki`) attests the KMS on a simulated TD and is the only
root its verifier trusts.

Before anything else the KMS asks its own backend about itself (`authority.authorize_self`:
refused, it does not start). With the dev backend a replica gets the root keys only with this
KMS's onboarding token (`replica_token_file`, made 0600 when missing) or an allow-listed
measurement (`allow_mrs`); a replica presents the source's token from `onboard_token_file`.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog

from pydstack.adapters.nats import EventStore
from pydstack.adapters.tdx.collateral import CollateralCache
from pydstack.adapters.tdx.ratls import Attester
from pydstack.core.kms import AuthBackend
from pydstack_guest import LocalKeyProvider

from .authority import APPS_ONLY, KmsAuthority, SelfRefused, authorize_self, read_token
from .backends import BackendConfigError, WebhookBackend, make_backend
from .http import serve_kms
from .keystore import GuestAgentSealKey, KeyProviderSealKey, RootKeyFile, SealKeySource
from .service import KmsService, KmsSettings

log = structlog.get_logger("pydstack.kms")

INTEL_PCCS = "https://api.trustedservices.intel.com/tdx/certification/v4"


class LaunchError(ValueError):
    """Options that cannot start a KMS; the message says which and what to give instead."""


@dataclass(frozen=True, slots=True)
class KmsLaunch:
    key_file: str
    cluster: str = "main"
    host: str = "127.0.0.1"
    port: int = 0
    seal_appkeys: str | None = None  # appkeys.json of this instance's key provider
    guest_agent: str | None = None  # dstack guest agent socket (seal key + attestation)
    auth: str = "webhook"
    auth_url: str = ""
    eth_rpc_url: str = ""  # auth "eth": the chain's JSON-RPC endpoint
    kms_contract: str = ""  # auth "eth": the DstackKms contract's address
    allow_dev_auth: bool = False
    dev_pki: str | None = None
    pccs_url: str = INTEL_PCCS
    instance_id: str = ""
    onboard_from: str = ""  # a running replica's URL: get the cluster's root keys from it first
    onboard_token_file: str = ""  # the source's onboarding token, presented with onboard_from
    # dev backend only: this KMS's onboarding token (made 0600 when missing), which a replica
    # must present, and the measurements (MRTD, mr_aggregated, mr_system) allowed to onboard
    replica_token_file: str = ""
    allow_mrs: tuple[str, ...] = ()


@asynccontextmanager
async def running_kms(store: EventStore, opts: KmsLaunch) -> AsyncIterator[str]:
    """Open (or create, once per cluster) the KMS and serve its RPC; yields its base URL."""
    seal: SealKeySource
    if opts.guest_agent:
        seal = GuestAgentSealKey(opts.guest_agent)
    elif opts.seal_appkeys:
        seal = KeyProviderSealKey(LocalKeyProvider(opts.seal_appkeys))
    else:
        raise LaunchError("give a guest agent socket or an appkeys.json (the seal key source)")
    root_der, attester, collateral = await _trust(opts)
    try:
        backend = make_backend(
            opts.auth, url=opts.auth_url, allow_dev=opts.allow_dev_auth, store=store,
            eth_rpc_url=opts.eth_rpc_url, kms_contract=opts.kms_contract,
        )  # fmt: skip
    except BackendConfigError as exc:
        raise LaunchError(str(exc)) from None
    async with contextlib.AsyncExitStack() as stack:
        if isinstance(backend, WebhookBackend):
            stack.push_async_callback(backend.close)
        authority = _authority(opts, backend.name)
        settings = KmsSettings(
            cluster=opts.cluster, root_ca_der=root_der, instance_id=opts.instance_id
        )
        try:
            await authorize_self(backend, attester, collateral, policy=settings.policy,
                                 root_ca_der=root_der, now=int(time.time()))  # fmt: skip
        except SelfRefused as exc:
            raise LaunchError(str(exc)) from None
        keyfile = RootKeyFile(opts.key_file, opts.cluster, seal)
        if opts.onboard_from and not keyfile.exists():
            await _onboard(store, opts, attester, backend, collateral, keyfile, root_der, authority)
        svc = await KmsService.open(
            store, settings, backend=backend, collateral=collateral, keyfile=keyfile,
            attester=attester, authority=authority,
        )  # fmt: skip
        async with svc, serve_kms(svc, opts.host, opts.port) as url:
            _ready(url, backend.name, authority)
            yield url


def _authority(opts: KmsLaunch, backend: str) -> KmsAuthority:
    """How this KMS authorizes replicas; LaunchError for options only the dev backend has."""
    if backend not in APPS_ONLY and (opts.allow_mrs or opts.replica_token_file):
        raise LaunchError(
            f"the {backend} backend decides which KMS may join (bootAuth/kms); an onboarding "
            "token or --kms-allow-mr is how the log and dev backends, which authorize apps "
            "only, do"
        )
    try:
        return KmsAuthority.create(token_file=opts.replica_token_file, allow_mrs=opts.allow_mrs)
    except ValueError as exc:  # a bad measurement; a token file others can read
        raise LaunchError(str(exc)) from None


async def _onboard(
    store: EventStore, opts: KmsLaunch, attester: Attester | None, backend: AuthBackend,
    collateral: CollateralCache, keyfile: RootKeyFile, root_der: bytes | None,
    authority: KmsAuthority,
) -> None:  # fmt: skip
    if attester is None:
        raise LaunchError("onboarding needs an attestation source (--guest-agent or --dev-pki)")
    from .onboard import onboard_replica

    try:
        token = read_token(opts.onboard_token_file) if opts.onboard_token_file else ""
    except ValueError as exc:
        raise LaunchError(f"onboarding token: {exc}") from None
    await onboard_replica(
        store, opts.cluster, source_url=opts.onboard_from, attester=attester, backend=backend,
        collateral=collateral, keyfile=keyfile, root_ca_der=root_der, token=token,
        authority=authority,
    )  # fmt: skip


def _ready(url: str, backend: str, authority: KmsAuthority) -> None:
    if backend == "dev":
        log.warning(
            "kms ready: DEV AUTHORIZATION (every attested app gets its keys; this KMS "
            "authorized itself unchecked; a replica needs the onboarding token or an "
            "allow-listed measurement)",
            url=url, auth="dev", onboard_token_file=str(authority.token_file or "") or None,
        )  # fmt: skip
    else:
        log.info("kms ready", url=url, auth=backend)


async def _trust(opts: KmsLaunch) -> tuple[bytes | None, Attester | None, CollateralCache]:
    if not opts.dev_pki:
        return None, None, CollateralCache.pccs(opts.pccs_url)
    from pydstack.adapters.tdx.backend import SimulatorBackend
    from pydstack.adapters.tdx.devpccs import dev_collateral
    from pydstack.adapters.tdx.pki import DevPki
    from pydstack.adapters.tdx.simulator import QuoteSimulator, TdMeasurements
    from pydstack_guest import GuestAgent, GuestConfig
    from pydstack_guest.agent import measure_identity

    pki = DevPki.load(opts.dev_pki)
    backend = SimulatorBackend(
        QuoteSimulator(pki), TdMeasurements(mr_td=hashlib.sha384(b"kms image").digest())
    )
    attester = None
    if opts.seal_appkeys:
        keys = await LocalKeyProvider(opts.seal_appkeys).app_keys()
        # The simulated KMS TD measures an identity as a dstack KMS CVM's boot does, so a peer
        # KMS (replica onboarding) sees an app id and instance id in its quote's event log.
        name = f"pydstack-kms:{opts.cluster}"
        await measure_identity(
            backend, app_id=hashlib.sha256(name.encode()).digest()[:20], app_compose=name,
            instance_id=hashlib.sha256(f"{name}:{opts.key_file}".encode()).digest()[:20],
        )  # fmt: skip
        attester = GuestAgent(backend, keys, GuestConfig())
    return pki.root_der, attester, dev_collateral(pki)
