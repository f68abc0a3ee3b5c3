"""Run one KMS instance: `python -m pydstack.actors.kms --nats URL --cluster NAME ...`.

The KMS attests itself, as dstack's does: inside a CVM pass `--guest-agent /var/run/dstack.sock`
(its quotes and seal key come from the dstack guest agent's `Attest` / `GetKey`); on a
simulated platform `--dev-pki DIR --seal-appkeys FILE` attest it on a simulated TD. With
neither it exits with one line: a KMS that cannot attest does not serve. `--dev-pki` also
makes it trust that simulator's quotes (with `--guest-agent`: a simulated CVM's agent, e.g.
`pydstack attest simulate --dev-pki DIR`). Before serving it asks its own backend
about itself (bootAuth/kms; refused: one line and exit 1; `--auth dev` allows itself, loudly).
Prints `KMS_URL=<url>` once serving. With `--auth dev` no replica gets the root keys without
this KMS's onboarding token (`--replica-token-file`) or an allow-listed measurement
(`--allow-mr`); a replica passes the source's token with `--onboard-token-file`.
`--workers N` (default: one per core) serves from N processes on one port (`workers.py`);
`--metrics-port P` then gives worker i the port P + i.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys

import click

from pydstack.logs import configure
from pydstack.loop import run as run_loop


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
    help="without --guest-agent: appkeys.json of the simulated KMS TD's key provider (its "
    "seal key)",
)
@click.option(
    "--guest-agent",
    type=click.Path(),
    default=None,
    help="the dstack guest agent of the CVM this KMS runs in (its attestation and seal key)",
)
@click.option(
    "--auth",
    type=click.Choice(["webhook", "log", "eth", "dev"]),
    default="webhook",
    help="log: an app's own AppRegistered/AppUpgraded events name its allowed composes; "
    "eth: a DstackKms contract (--eth-rpc-url, --kms-contract)",
)
@click.option("--auth-url", default="")
@click.option(
    "--eth-rpc-url",
    default="",
    envvar="PYDSTACK_ETH_RPC_URL",
    help="--auth eth: the chain's JSON-RPC endpoint [env PYDSTACK_ETH_RPC_URL]",
)
@click.option(
    "--kms-contract", default="", metavar="ADDR", help="--auth eth: the DstackKms contract"
)
@click.option("--allow-dev-auth", is_flag=True, envvar="PYDSTACK_KMS_ALLOW_DEV")
@click.option(
    "--gateway-app-id", default="", metavar="HEX",
    help="--auth log/dev: the gateway's app id (40 hex digits) dstack guests are told to "
    "accept a gateway certificate of (GetMeta, GetAppKey gateway_app_id)",
)  # fmt: skip
@click.option(
    "--dev-pki",
    type=click.Path(file_okay=False),
    default=None,
    help="trust this simulator PKI (dev only); without --guest-agent also attest on a "
    "simulated TD of it",
)
@click.option("--pccs-url", default="https://api.trustedservices.intel.com/tdx/certification/v4")
@click.option("--instance-id", default="")
@click.option(
    "--onboard-from",
    default="",
    metavar="URL",
    help="a running replica: get the cluster's root keys from it (both sides attest) first",
)
@click.option(
    "--onboard-token-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="with --onboard-from: the source KMS's onboarding token (mode 0600), sent inside the "
    "mutual RA-TLS channel; what a dev-backend source needs to release its root keys",
)
@click.option(
    "--replica-token-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="--auth dev: this KMS's onboarding token, made 0600 when missing; a replica "
    "presenting it gets the root keys",
)
@click.option(
    "--allow-mr",
    "allow_mrs",
    multiple=True,
    metavar="HEX",
    help="--auth dev: a replica (or source) measurement allowed to hold the root keys: MRTD "
    "(96 hex digits; names the firmware only) or mr_aggregated / mr_system (64); repeatable",
)
@click.option(
    "--signer-seed-file",
    type=click.Path(dir_okay=False),
    envvar="PYDSTACK_KMS_SIGNER_SEED_FILE",
    default=None,
    help="the seed of this KMS's keyring identity (role kms), which signs its events and logs "
    "in to NATS: an nkey seed file (a data dir's identities/kms.nk) or 32 raw bytes / 64 hex "
    "digits, mode 0600; required (a random key is on no keyring: every fold would refuse its "
    "events); a file, never a value: argv is world-readable",
)
@click.option(
    "--keyring",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="keyring.json whose admin key roots the log's keyring (pinned; else the first "
    "keyring entry's own signer)",
)
@click.option(
    "--metrics-port",
    type=int,
    default=0,
    help="serve Prometheus /metrics on 127.0.0.1:PORT (0: off); pydstack_kms_refused_total "
    "counts the requests refused without an event",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=os.cpu_count() or 1,
    show_default="the number of cores",
    help="serve from this many processes on one port (SO_REUSEPORT), each with its own NATS "
    "connection and decision log; a worker that exits is restarted",
)
@click.option("--worker-index", type=int, default=-1, hidden=True)  # set by the supervisor
@click.option("--worker-restart", is_flag=True, hidden=True)
def main(workers: int, **o: object) -> None:
    configure(level="info")
    if workers > 1 and o["worker_index"] == -1:  # the supervisor: no NATS, no keys
        from .workers import supervise

        args = sys.argv[1:]
        port, metrics = int(o["port"]), int(o["metrics_port"])  # type: ignore[call-overload]
        sys.exit(asyncio.run(supervise(args, workers, port, metrics)))
    run_loop(run(**o))  # type: ignore[arg-type]  # uvloop when installed: cheaper TLS per request


async def run(
    nats_url: str, cluster: str, host: str, port: int, key_file: str, seal_appkeys: str | None,
    guest_agent: str | None, auth: str, auth_url: str, allow_dev_auth: bool,
    dev_pki: str | None, pccs_url: str, instance_id: str, signer_seed_file: str | None,
    onboard_from: str = "", metrics_port: int = 0, onboard_token_file: str | None = None,
    replica_token_file: str | None = None, allow_mrs: tuple[str, ...] = (),
    keyring: str | None = None, eth_rpc_url: str = "", kms_contract: str = "",
    worker_index: int = -1, worker_restart: bool = False, gateway_app_id: str = "",
) -> None:  # fmt: skip
    from pydstack.adapters.nats import EventStore, StoreError
    from pydstack.adapters.nats.identity import standalone_identity

    from .client import KmsCallError
    from .launch import KmsLaunch, LaunchError, running_kms
    from .service import KmsError

    try:
        signer, nkey, anchor = standalone_identity(
            signer_seed_file, f"kms-{instance_id or cluster}", "kms", keyring,
            "--signer-seed-file",
        )  # fmt: skip
    except StoreError as exc:
        raise click.BadParameter(str(exc), param_hint="--signer-seed-file") from None
    opts = KmsLaunch(
        key_file=key_file, cluster=cluster, host=host, port=port, seal_appkeys=seal_appkeys,
        guest_agent=guest_agent, auth=auth, auth_url=auth_url, allow_dev_auth=allow_dev_auth,
        dev_pki=dev_pki, pccs_url=pccs_url, instance_id=instance_id, onboard_from=onboard_from,
        onboard_token_file=onboard_token_file or "", replica_token_file=replica_token_file or "",
        allow_mrs=allow_mrs, eth_rpc_url=eth_rpc_url, kms_contract=kms_contract,
        worker=worker_index, worker_restart=worker_restart, gateway_app_id=gateway_app_id,
    )  # fmt: skip
    store = await EventStore.connect(nats_url, signer, nkey_seed=nkey, anchor=anchor)
    await store.ensure_stream()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    from pydstack.actors.metrics import serve_metrics

    stop_metrics = serve_metrics(metrics_port) if metrics_port else None
    try:
        async with store, running_kms(store, opts) as url:
            # What start-up loaded (modules, root keys, folded state) lives as long as the
            # process: out of the cyclic GC's sight, gen-2 collections stay cheap per request.
            gc.freeze()
            print(f"KMS_URL={url}", flush=True)
            await stop.wait()
    except (LaunchError, KmsError, KmsCallError) as exc:  # refused to start: one line
        raise click.ClickException(str(exc)) from None
    finally:
        if stop_metrics is not None:
            stop_metrics()
    sys.exit(0)


if __name__ == "__main__":
    main()
