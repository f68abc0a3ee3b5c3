"""A KMS that cannot attest itself does not serve. The attack: a KMS root published with no
evidence (an empty bootstrap attestation, an RA-TLS certificate without a quote) is one a host
could have made; so with no evidence source, an unreachable guest agent, or an agent whose
quotes do not verify under the KMS's trust, the KMS stops with one line and puts nothing on
the log."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from pydstack.actors.kms.launch import KmsLaunch, LaunchError, running_kms
from pydstack.adapters.nats import EventStore, NatsServer
from pydstack.adapters.secretfile import write_secret
from pydstack.adapters.tdx.devpccs import devpccs_app
from pydstack.adapters.tdx.pki import DevPki
from pydstack_guest import create_dev_app_keys
from tests.kms import conftest as rig
from tests.kms.test_self_evidence import APP_A, simulated_agent

pki = rig.pki


async def nothing_on_the_log(store: EventStore) -> bool:
    return [r async for r in store.read(subject="dstack.kms.>")] == []


async def test_a_kms_with_no_evidence_source_does_not_start(
    nats_server: NatsServer, store: EventStore, tmp_path: Path
) -> None:
    """`python -m pydstack.actors.kms` with a seal key but neither --guest-agent nor
    --dev-pki: one line naming both ways, exit 1, no root on the log, no key file."""
    write_secret(tmp_path / "appkeys.json", create_dev_app_keys(b"\x42" * 20, now=0)[1])
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "pydstack.actors.kms", "--nats", nats_server.url, "--port", "0",
         "--key-file", str(tmp_path / "root.sealed"), "--seal-appkeys",
         str(tmp_path / "appkeys.json"), "--auth", "dev", "--allow-dev-auth",
         "--signer-seed-file", str(write_secret(tmp_path / "kms.seed", os.urandom(32).hex()))],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and b"KMS_URL=" not in proc.stdout
    errors = [ln for ln in proc.stderr.decode().splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "cannot attest itself" in errors[0], proc.stderr.decode()[-2000:]
    assert "--guest-agent SOCKET" in errors[0] and "--dev-pki DIR" in errors[0]
    assert await nothing_on_the_log(store)
    assert not (tmp_path / "root.sealed").exists()


async def test_an_unreachable_guest_agent_stops_the_start(
    store: EventStore, pki: DevPki, tmp_path: Path
) -> None:
    """--guest-agent naming no agent: refused before any root is made."""
    pki.save(tmp_path / "pki")
    launch = KmsLaunch(
        key_file=str(tmp_path / "root.sealed"), guest_agent=str(tmp_path / "none.sock"),
        auth="dev", allow_dev_auth=True, dev_pki=str(tmp_path / "pki"),
    )  # fmt: skip
    with pytest.raises(LaunchError, match=r"cannot attest itself: guest agent at .*none\.sock"):
        async with running_kms(store, launch):
            pass
    assert await nothing_on_the_log(store)
    assert not (tmp_path / "root.sealed").exists()


async def test_a_simulated_agent_is_refused_by_a_kms_that_trusts_intel_only(
    store: EventStore, pki: DevPki, tmp_path: Path, short_tmp: Path
) -> None:
    """The host points a production KMS (no --dev-pki: Intel's root) at a simulated guest
    agent: its quotes do not chain to Intel's root, so the KMS refuses to serve rather than
    publish a root bound to simulated evidence. (Collateral from a PCCS-shaped server.)"""
    pki.save(tmp_path / "pki")
    runner = web.AppRunner(devpccs_app(pki, now=lambda: int(time.time())))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    pccs = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        async with simulated_agent(short_tmp / "a", tmp_path / "pki", APP_A) as sock:
            launch = KmsLaunch(
                key_file=str(tmp_path / "root.sealed"), guest_agent=sock, auth="dev",
                allow_dev_auth=True, pccs_url=pccs,
            )  # fmt: skip
            with pytest.raises(LaunchError, match="own evidence does not verify") as info:
                async with running_kms(store, launch):
                    pass
    finally:
        await runner.cleanup()
    assert "give --dev-pki DIR" in str(info.value) and "\n" not in str(info.value)
    assert await nothing_on_the_log(store)
    assert not (tmp_path / "root.sealed").exists()


async def test_a_guest_agent_kms_takes_no_second_seal_key_source(
    store: EventStore, tmp_path: Path
) -> None:
    """--guest-agent with --seal-appkeys (a host-written appkeys.json) is refused by name,
    not silently resolved one way or the other."""
    write_secret(tmp_path / "appkeys.json", create_dev_app_keys(b"\x42" * 20, now=0)[1])
    launch = KmsLaunch(
        key_file=str(tmp_path / "root.sealed"), guest_agent=str(tmp_path / "agent.sock"),
        seal_appkeys=str(tmp_path / "appkeys.json"), auth="dev", allow_dev_auth=True,
    )  # fmt: skip
    with pytest.raises(LaunchError, match=r"--seal-appkeys .* give one of them"):
        async with running_kms(store, launch):
            pass
    assert await nothing_on_the_log(store)


async def test_the_service_itself_refuses_to_create_an_unattested_root(
    store: EventStore, pki: DevPki, tmp_path: Path
) -> None:
    """Below every launcher: KmsService.open with no attester on a cluster without a root
    raises, naming the cluster, before a key file or an event exists (a future entry point
    that forgets the evidence source cannot publish a root nobody can check)."""
    from pydstack.actors.kms.backends import DevBackend
    from pydstack.actors.kms.service import KmsError, KmsService, KmsSettings

    _, keyfile = rig.kms_guest(pki, tmp_path, "kms-x")
    with pytest.raises(KmsError, match=r"cluster 'main' .* cannot attest itself"):
        await KmsService.open(
            store, KmsSettings(cluster="main", root_ca_der=pki.root_der, instance_id="kms-x"),
            backend=DevBackend(enabled=True), collateral=rig.CollateralBox(pki), keyfile=keyfile,
        )  # fmt: skip
    assert await nothing_on_the_log(store)
    assert not keyfile.path.exists()
