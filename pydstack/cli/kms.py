"""`pydstack kms …`: run a KMS instance and audit its decisions.

    pydstack kms serve --nats URL --key-file root.sealed --guest-agent /var/run/dstack.sock \
        --auth webhook --auth-url http://127.0.0.1:8000        # inside a CVM
    pydstack kms serve ... --dev-pki DIR --seal-appkeys appkeys.json   # simulated platform
    pydstack kms audit --nats URL --cluster main --collateral coll.json [--dev-pki DIR]
    pydstack kms contract deploy | add-os-image | add-kms-measurement   (the eth backend's)
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import click

from pydstack.actors.kms.__main__ import main as serve_main

from .contract import kms_contract


@click.group("kms")
def kms() -> None:
    """The key management service (dstack-compatible KMS)."""


kms.add_command(serve_main, "serve")
kms.add_command(kms_contract, "contract")  # deploy | add-os-image | add-kms-measurement


@kms.command("audit")
@click.option("--nats", "nats_url", required=True, envvar="PYDSTACK_NATS")
@click.option("--cluster", default="main")
@click.option("--collateral", type=click.Path(exists=True, dir_okay=False), default=None,
              help="collateral JSON valid at the decisions' time")  # fmt: skip
@click.option("--dev-pki", type=click.Path(file_okay=False), default=None,
              help="trust a simulator PKI (its collateral is regenerated)")  # fmt: skip
def audit(nats_url: str, cluster: str, collateral: str | None, dev_pki: str | None) -> None:
    """Re-verify every KeyIssued of CLUSTER against its recorded quote, log and policy."""
    coll_text = Path(collateral).read_bytes() if collateral else None
    problems = asyncio.run(_audit(nats_url, cluster, coll_text, dev_pki))
    for p in problems:
        click.echo(p)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in dstack.kms.{cluster}")
    click.echo(f"dstack.kms.{cluster}: every decision re-verifies")


async def _audit(
    nats_url: str, cluster: str, collateral: bytes | None, dev_pki: str | None
) -> list[str]:
    import time

    from pydstack.actors.kms import make_recheck
    from pydstack.actors.kms.certgrants import boot_time_of
    from pydstack.adapters.nats import EventStore
    from pydstack.adapters.tdx.collateral import Collateral, collateral_from_json
    from pydstack.adapters.tdx.pki import DevPki
    from pydstack.core.events import Signer, decode_body, open_envelope
    from pydstack.core.kms import audit_kms_log

    root_der = None
    if dev_pki:
        pki = DevPki.load(dev_pki)
        root_der = pki.root_der
        coll: Collateral = collateral_from_json(pki.collateral_json(int(time.time())))
    elif collateral:
        coll = collateral_from_json(collateral)
    else:
        raise click.ClickException("give --collateral FILE (or --dev-pki DIR for simulator quotes)")
    signer = Signer.from_private_bytes("kms-auditor", os.urandom(32))
    async with await EventStore.connect(nats_url, signer) as store:
        records, _ = await store.read_aggregate(f"dstack.kms.{cluster}")
    events = [decode_body(open_envelope(r.data)) for r in records]
    return audit_kms_log(events, make_recheck(lambda _q: coll, root_der), boot_time_of)
