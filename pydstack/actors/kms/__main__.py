"""Run one KMS instance: `python -m pydstack.actors.kms --nats URL --cluster NAME ...`.

Dev/simulator options (`--dev-pki DIR`) make it trust a simulator PKI and attest itself on a
simulated TD; on a TDX host pass `--guest-agent /var/run/dstack.sock` instead (seal key and
attestation then come from the dstack guest agent). Prints `KMS_URL=<url>` once serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import sys

import click

from pydstack.logs import configure


@click.command()
@click.option("--nats", "nats_url", required=True)
@click.option("--cluster", default="main")
@click.option("--host", default="127.0.0.1")
@click.option("--port", default=9100, type=int)
@click.option("--key-file", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--seal-appkeys",
    type=click.Path(dir_okay=False),
    default=None,
    help="appkeys.json of this instance's key provider (seal key source)",
)
@click.option(
    "--guest-agent",
    type=click.Path(),
    default=None,
    help="dstack guest agent socket (seal key + attestation)",
)
@click.option("--auth", type=click.Choice(["webhook", "dev"]), default="webhook")
@click.option("--auth-url", default="")
@click.option("--allow-dev-auth", is_flag=True, envvar="PYDSTACK_KMS_ALLOW_DEV")
@click.option(
    "--dev-pki",
    type=click.Path(file_okay=False),
    default=None,
    help="trust this simulator PKI (dev only) and attest on a simulated TD",
)
@click.option("--pccs-url", default="https://api.trustedservices.intel.com/tdx/certification/v4")
@click.option("--instance-id", default="")
@click.option("--signer-seed-hex", envvar="PYDSTACK_KMS_SIGNER", default=None)
def main(**o: object) -> None:
    configure(level="info")
    asyncio.run(run(**o))  # type: ignore[arg-type]


async def run(
    nats_url: str, cluster: str, host: str, port: int, key_file: str, seal_appkeys: str | None,
    guest_agent: str | None, auth: str, auth_url: str, allow_dev_auth: bool,
    dev_pki: str | None, pccs_url: str, instance_id: str, signer_seed_hex: str | None,
) -> None:  # fmt: skip
    import os
    import time

    from pydstack.adapters.nats import EventStore
    from pydstack.adapters.tdx.collateral import Collateral, collateral_from_json
    from pydstack.core.events import Signer
    from pydstack_guest import LocalKeyProvider

    from . import (
        GuestAgentSealKey,
        KeyProviderSealKey,
        KmsService,
        KmsSettings,
        RootKeyFile,
        make_backend,
        serve_kms,
    )  # fmt: skip
    from .keystore import SealKeySource

    seed = bytes.fromhex(signer_seed_hex) if signer_seed_hex else os.urandom(32)
    signer = Signer.from_private_bytes(f"kms-{instance_id or cluster}", seed)
    seal: SealKeySource
    if guest_agent:
        seal = GuestAgentSealKey(guest_agent)
    elif seal_appkeys:
        seal = KeyProviderSealKey(LocalKeyProvider(seal_appkeys))
    else:
        raise click.ClickException("give --guest-agent or --seal-appkeys (the seal key source)")
    root_der = None
    attester = None
    colls: dict[str, Collateral] = {}
    if dev_pki:
        from pydstack.adapters.tdx.backend import SimulatorBackend
        from pydstack.adapters.tdx.pki import DevPki
        from pydstack.adapters.tdx.simulator import QuoteSimulator, TdMeasurements
        from pydstack_guest import GuestAgent, GuestConfig

        pki = DevPki.load(dev_pki)
        root_der = pki.root_der
        backend = SimulatorBackend(
            QuoteSimulator(pki), TdMeasurements(mr_td=hashlib.sha384(b"kms image").digest())
        )
        keys = await LocalKeyProvider(seal_appkeys).app_keys() if seal_appkeys else None
        if keys is not None:
            attester = GuestAgent(backend, keys, GuestConfig())

        def collateral_json() -> str:
            return pki.collateral_json(int(time.time()))

        source = "dev"
    else:
        source = pccs_url

    async def collateral(q: bytes) -> Collateral:
        if source == "dev":
            if "c" not in colls:
                colls["c"] = collateral_from_json(collateral_json())
            return colls["c"]
        from pydstack.adapters.tdx.collateral import fetch_collateral

        return await fetch_collateral(source, q)

    store = await EventStore.connect(nats_url, signer)
    await store.ensure_stream()
    svc = await KmsService.open(
        store, KmsSettings(cluster=cluster, root_ca_der=root_der, instance_id=instance_id),
        backend=make_backend(auth, url=auth_url, allow_dev=allow_dev_auth),
        collateral=collateral, keyfile=RootKeyFile(key_file, cluster, seal), attester=attester,
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with store, svc, serve_kms(svc, host, port) as url:
        print(f"KMS_URL={url}", flush=True)
        await stop.wait()
    sys.exit(0)


if __name__ == "__main__":
    main()
