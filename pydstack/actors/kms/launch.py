"""Start one KMS instance from plain options: used by `python -m pydstack.actors.kms` and by
`pydstack up`.

    async with running_kms(store, KmsLaunch(cluster="main", key_file=..., ...)) as url:
        ...

The KMS attests itself (`selfevidence`): inside a CVM through its dstack guest agent
(`guest_agent`, which also gives the seal key), on a simulated platform on a simulated TD of
the dev PKI (`dev_pki` + `seal_appkeys`); with neither it does not start. `dev_pki` also makes
it trust that simulator's root (else Intel's, with the PCCS's collateral).

Before anything else the KMS asks its own backend about itself (`authority.authorize_self`:
refused, it does not start). With the dev backend a replica gets the root keys only with this
KMS's onboarding token (`replica_token_file`, made 0600 when missing) or an allow-listed
measurement (`allow_mrs`); a replica presents the source's token from `onboard_token_file`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog

from pydstack.adapters.nats import EventStore
from pydstack.adapters.tdx.collateral import CollateralCache
from pydstack.adapters.tdx.ratls import Attester
from pydstack.core.kms import AuthBackend

from .authority import APPS_ONLY, KmsAuthority, SelfRefused, authorize_self, read_token
from .backends import BackendConfigError, WebhookBackend, make_backend
from .http import serve_kms
from .keystore import RootKeyFile
from .selfevidence import SelfEvidenceError, self_evidence
from .service import KmsService, KmsSettings
from .workers import close_worker_cut_offs, worker_label

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
    seal_appkeys: str | None = None  # appkeys.json of the simulated TD's key provider
    guest_agent: str | None = None  # dstack guest agent socket (attestation + seal key)
    auth: str = "webhook"
    auth_url: str = ""
    eth_rpc_url: str = ""  # auth "eth": the chain's JSON-RPC endpoint
    kms_contract: str = ""  # auth "eth": the DstackKms contract's address
    # auth "log"/"dev": the app whose KMS certificate dstack's guests take from a gateway
    # (GetMeta / GetAppKey gateway_app_id; webhook and eth name their own)
    gateway_app_id: str = ""
    allow_dev_auth: bool = False
    dev_pki: str | None = None  # simulator PKI: trusted, and the simulated TD's (no agent)
    pccs_url: str = INTEL_PCCS
    instance_id: str = ""
    onboard_from: str = ""  # a running replica's URL: get the cluster's root keys from it first
    onboard_token_file: str = ""  # the source's onboarding token, presented with onboard_from
    # dev backend only: this KMS's onboarding token (made 0600 when missing), which a replica
    # must present, and the measurements (MRTD, mr_aggregated, mr_system) allowed to onboard
    replica_token_file: str = ""
    allow_mrs: tuple[str, ...] = ()
    # one of several worker processes (`workers`): its index (-1: the only process) and
    # whether the supervisor restarted it (then it leaves its siblings' requests alone)
    worker: int = -1
    worker_restart: bool = False

    @property
    def label(self) -> str:
        """The `kms_instance` this process's requests carry."""
        return self.instance_id if self.worker < 0 else worker_label(self.instance_id, self.worker)


@asynccontextmanager
async def running_kms(store: EventStore, opts: KmsLaunch) -> AsyncIterator[str]:
    """Open (or create, once per cluster) the KMS and serve its RPC; yields its base URL."""
    policy = KmsSettings(cluster=opts.cluster).policy
    try:
        ev = await self_evidence(
            guest_agent=opts.guest_agent, dev_pki=opts.dev_pki, seal_appkeys=opts.seal_appkeys,
            cluster=opts.cluster, key_file=opts.key_file, pccs_url=opts.pccs_url, policy=policy,
        )  # fmt: skip
    except SelfEvidenceError as exc:
        raise LaunchError(str(exc)) from None
    root_der, attester, collateral = ev.root_ca_der, ev.attester, ev.collateral
    try:
        backend = make_backend(
            opts.auth, url=opts.auth_url, allow_dev=opts.allow_dev_auth, store=store,
            eth_rpc_url=opts.eth_rpc_url, kms_contract=opts.kms_contract,
            gateway_app_id=opts.gateway_app_id,
        )  # fmt: skip
    except BackendConfigError as exc:
        raise LaunchError(str(exc)) from None
    async with contextlib.AsyncExitStack() as stack:
        if isinstance(backend, WebhookBackend):
            stack.push_async_callback(backend.close)
        authority = _authority(opts, backend.name)
        settings = KmsSettings(cluster=opts.cluster, root_ca_der=root_der, instance_id=opts.label)
        try:
            await authorize_self(backend, attester, collateral, policy=settings.policy,
                                 root_ca_der=root_der, now=int(time.time()))  # fmt: skip
        except SelfRefused as exc:
            raise LaunchError(str(exc)) from None
        keyfile = RootKeyFile(opts.key_file, opts.cluster, ev.seal)
        if opts.onboard_from and not keyfile.exists():
            await _onboard(store, opts, attester, backend, collateral, keyfile, root_der, authority)
        if opts.worker <= 0 and not opts.worker_restart:  # nothing of this KMS serves yet
            await close_worker_cut_offs(store, opts.cluster, opts.instance_id)
        svc = await KmsService.open(
            store, settings, backend=backend, collateral=collateral, keyfile=keyfile,
            attester=attester, authority=authority,
        )  # fmt: skip
        async with svc, serve_kms(svc, opts.host, opts.port, reuse_port=opts.worker >= 0) as url:
            _ready(url, backend.name, authority, ev.source)
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
    store: EventStore, opts: KmsLaunch, attester: Attester, backend: AuthBackend,
    collateral: CollateralCache, keyfile: RootKeyFile, root_der: bytes | None,
    authority: KmsAuthority,
) -> None:  # fmt: skip
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


def _ready(url: str, backend: str, authority: KmsAuthority, evidence: str) -> None:
    if backend == "dev":
        log.warning(
            "kms ready: DEV AUTHORIZATION (every attested app gets its keys; this KMS "
            "authorized itself unchecked; a replica needs the onboarding token or an "
            "allow-listed measurement)",
            url=url, auth="dev", onboard_token_file=str(authority.token_file or "") or None,
            evidence=evidence,
        )  # fmt: skip
    else:
        log.info("kms ready", url=url, auth=backend, evidence=evidence)
