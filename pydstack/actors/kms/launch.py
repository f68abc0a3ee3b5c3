"""Start one KMS instance from plain options: used by `python -m pydstack.actors.kms` and by
`pydstack up`.

    async with running_kms(store, KmsLaunch(cluster="main", key_file=..., ...)) as url:
        ...

On a TDX host the seal key and attestation come from the dstack guest agent (`guest_agent`);
on a dev machine a simulator PKI (`dev_pki`) attests the KMS on a simulated TD and is the only
root its verifier trusts.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dcap_qvl

from pydstack.adapters.nats import EventStore
from pydstack.adapters.tdx.collateral import Collateral, collateral_from_json, fetch_collateral
from pydstack.adapters.tdx.ratls import Attester
from pydstack_guest import LocalKeyProvider

from .backends import make_backend
from .http import serve_kms
from .keystore import GuestAgentSealKey, KeyProviderSealKey, RootKeyFile, SealKeySource
from .service import KmsService, KmsSettings

if TYPE_CHECKING:
    from pydstack.adapters.tdx.pki import DevPki

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
    allow_dev_auth: bool = False
    dev_pki: str | None = None
    pccs_url: str = INTEL_PCCS
    instance_id: str = ""
    onboard_from: str = ""  # a running replica's URL: get the cluster's root keys from it first


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
    backend = make_backend(opts.auth, url=opts.auth_url, allow_dev=opts.allow_dev_auth)
    keyfile = RootKeyFile(opts.key_file, opts.cluster, seal)
    if opts.onboard_from and not keyfile.exists():
        if attester is None:
            raise LaunchError("onboarding needs an attestation source (--guest-agent or --dev-pki)")
        from .onboard import onboard_replica

        await onboard_replica(
            store, opts.cluster, source_url=opts.onboard_from, attester=attester,
            backend=backend, collateral=collateral, keyfile=keyfile, root_ca_der=root_der,
        )  # fmt: skip
    svc = await KmsService.open(
        store,
        KmsSettings(cluster=opts.cluster, root_ca_der=root_der, instance_id=opts.instance_id),
        backend=backend,
        collateral=collateral,
        keyfile=keyfile,
        attester=attester,
    )
    async with svc, serve_kms(svc, opts.host, opts.port) as url:
        yield url


async def _trust(opts: KmsLaunch) -> tuple[bytes | None, Attester | None, _Collateral]:
    if not opts.dev_pki:
        return None, None, _Collateral(opts.pccs_url, None)
    from pydstack.adapters.tdx.backend import SimulatorBackend
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
    return pki.root_der, attester, _Collateral("", pki)


class _Collateral:
    """Collateral for a quote: from the dev PKI (made once, valid 30 days) or a PCCS.

    PCCS answers are kept per platform (FMSPC + PCK CA) for `ttl` seconds: without that every
    key request would wait on a PCS round trip. Only the collateral is reused, never a
    verdict: each quote is still verified in full, at its own `now`, against it (an expired
    CRL or TCB info then shows as a refusal reason). Failed fetches are not kept, and
    concurrent requests for a platform share one fetch.
    """

    def __init__(
        self,
        pccs_url: str,
        pki: DevPki | None,
        *,
        ttl: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pccs_url = pccs_url
        self.pki = pki
        self.ttl = ttl
        self.clock = clock
        self.fetches = 0
        self._dev: Collateral | None = None
        self._pccs: dict[str, tuple[float, asyncio.Future[Collateral]]] = {}

    async def __call__(self, quote: bytes) -> Collateral:
        if self.pki is not None:
            if self._dev is None:
                self._dev = collateral_from_json(self.pki.collateral_json(int(time.time())))
            return self._dev
        key = _platform(quote)
        hit = self._pccs.get(key)
        if hit is not None and self.clock() - hit[0] < self.ttl:
            return await asyncio.shield(hit[1])
        fut: asyncio.Future[Collateral] = asyncio.ensure_future(self._fetch(quote))
        self._pccs[key] = (self.clock(), fut)
        fut.add_done_callback(lambda f: self._forget_failed(key, f))
        return await asyncio.shield(fut)

    async def _fetch(self, quote: bytes) -> Collateral:
        self.fetches += 1
        return await fetch_collateral(self.pccs_url, quote)

    def _forget_failed(self, key: str, fut: asyncio.Future[Collateral]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            if self._pccs.get(key, (0.0, None))[1] is fut:
                del self._pccs[key]


def _platform(quote: bytes) -> str:
    """The collateral a quote needs depends on its platform (FMSPC) and PCK CA only."""
    try:
        q = dcap_qvl.parse_quote(quote)
        return f"{q.fmspc()}-{q.ca()}"
    except ValueError:
        return "unparsed:" + hashlib.sha256(quote).hexdigest()  # fetch_collateral refuses it
