"""A KMS that attests itself through a dstack guest agent (`KmsLaunch(guest_agent=SOCKET)`),
here `pydstack attest simulate`'s socket (a simulated CVM serving dstack.sock): the root is
bootstrapped with the agent's quote, bound as dstack's KMS binds it, and a replica onboards
through its own agent. The KMS gets `dev_pki` only to trust the simulator's root: neither
KMS quotes on a TD of its own (their quotes name the agents' app ids)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from Crypto.Hash import keccak

from pydstack.actors.kms import KmsClient
from pydstack.actors.kms.evidence import check_attestation
from pydstack.actors.kms.launch import KmsLaunch, running_kms
from pydstack.adapters.nats import EventStore
from pydstack.adapters.tdx.attestation import decode_attestation
from pydstack.adapters.tdx.collateral import collateral_from_json
from pydstack.adapters.tdx.identity import find_event_payload
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.quote import parse_quote
from pydstack.adapters.tdx.verify import Policy
from pydstack.core.events import (
    KmsReplicaOnboarded,
    KmsRootCreated,
    decode_body,
    open_envelope,
    subject,
)
from tests.cli.harness import PYDSTACK


@contextlib.asynccontextmanager
async def simulated_agent(dir_: Path, pki_dir: Path, app_id: bytes) -> AsyncIterator[str]:
    """`pydstack attest simulate` on a socket of its own; yields the socket once it serves."""
    sock = dir_ / "dstack.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDSTACK_")}
    proc = await asyncio.create_subprocess_exec(
        PYDSTACK, "attest", "simulate", "--state", str(dir_ / "state"), "--socket", str(sock),
        "--dev-pki", str(pki_dir), "--app-id", app_id.hex(), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(300):
            if sock.exists() or proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        assert sock.exists(), "attest simulate did not serve its socket"
        yield str(sock)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


def agent_launch(
    tmp: Path, pki_dir: Path, sock: str, name: str, onboard_from: str = "", token: str = ""
) -> KmsLaunch:
    """What `python -m pydstack.actors.kms --guest-agent SOCK --dev-pki DIR` runs: no
    --seal-appkeys, so no simulated TD of its own."""
    return KmsLaunch(
        key_file=str(tmp / f"{name}.sealed"), cluster="main", guest_agent=sock, auth="dev",
        allow_dev_auth=True, dev_pki=str(pki_dir), instance_id=name,
        replica_token_file=str(tmp / f"{name}-onboard-token"), onboard_from=onboard_from,
        onboard_token_file=token,
    )  # fmt: skip


def dstack_bootstrap_report_data(ca_pubkey: bytes, k256_pubkey: bytes) -> bytes:
    """dstack v0.5.11 kms/src/onboard_service.rs `attest_keys`, written out again here."""
    text = f"dstack-kms-genereted-keys-v1:{ca_pubkey.hex()};{k256_pubkey.hex()};"
    digest = keccak.new(digest_bits=256, data=text.encode()).digest()
    return digest + bytes(32)  # pad64


async def kms_events(store: EventStore) -> list[object]:
    recs, _ = await store.read_aggregate(subject("kms", "main"))
    return [decode_body(open_envelope(r.data)) for r in recs]


APP_A = hashlib.sha256(b"kms cvm a").digest()[:20]
APP_B = hashlib.sha256(b"kms cvm b").digest()[:20]


async def test_root_bootstrapped_and_attested_through_the_guest_agent(
    store: EventStore, pki: DevPki, tmp_path: Path, short_tmp: Path
) -> None:
    """KmsRootCreated and GetMeta's bootstrap_info carry the agent's quote, whose report_data
    is dstack's binding of the CA and k256 public keys; it verifies under the dev root."""
    pki.save(tmp_path / "pki")
    async with (
        simulated_agent(short_tmp / "a", tmp_path / "pki", APP_A) as sock,
        running_kms(store, agent_launch(tmp_path, tmp_path / "pki", sock, "kms-a")) as url,
    ):
        async with KmsClient(url, dev_pki=pki) as c:
            meta = await c.call("GetMeta")
    [created] = [e for e in await kms_events(store) if isinstance(e, KmsRootCreated)]
    boot = meta["bootstrap_info"]
    ca_pub, k256 = bytes.fromhex(boot["ca_pubkey"]), bytes.fromhex(boot["k256_pubkey"])
    assert (ca_pub, k256) == (created.ca_public_key, created.k256_public_key)
    assert bytes.fromhex(boot["attestation"]) == created.attestation != b""
    att = decode_attestation(created.attestation)
    quote = parse_quote(att.quote)
    assert quote.report.report_data == dstack_bootstrap_report_data(ca_pub, k256)
    # The agent quoted it: its app id is in the runtime events, not a KMS-made TD's.
    assert find_event_payload(att.runtime_events, "app-id") == APP_A
    coll = collateral_from_json(pki.collateral_json(int(time.time())))
    ev = check_attestation(att, coll, policy=Policy(), now=int(time.time()),
                           root_ca_der=pki.root_der)  # fmt: skip
    assert ev.verified and ev.boot is not None and ev.boot.app_id == APP_A.hex()


async def test_replica_onboards_through_its_own_guest_agent(
    store: EventStore, pki: DevPki, tmp_path: Path, short_tmp: Path
) -> None:
    """Both KMSs attest through their agents (mutual RA-TLS); the replica gets the root the
    log names and serves the same CA; the onboarding names the token that allowed it."""
    pki_dir = tmp_path / "pki"
    pki.save(pki_dir)
    async with (
        simulated_agent(short_tmp / "a", pki_dir, APP_A) as sock_a,
        simulated_agent(short_tmp / "b", pki_dir, APP_B) as sock_b,
        running_kms(store, agent_launch(tmp_path, pki_dir, sock_a, "kms-a")) as url_a,
    ):
        token = str(tmp_path / "kms-a-onboard-token")
        replica = agent_launch(tmp_path, pki_dir, sock_b, "kms-b", url_a, token)
        async with running_kms(store, replica) as url_b:
            metas = []
            for url in (url_a, url_b):
                async with KmsClient(url, dev_pki=pki) as c:
                    metas.append(await c.call("GetMeta"))
    assert metas[0]["ca_cert"] == metas[1]["ca_cert"]
    assert metas[0]["k256_pubkey"] == metas[1]["k256_pubkey"]
    [onboarded] = [e for e in await kms_events(store) if isinstance(e, KmsReplicaOnboarded)]
    assert onboarded.authorization == "token"
    # the replica attested through its agent: the source recorded agent B's app id
    assert onboarded.boot_info is not None and onboarded.boot_info.app_id == APP_B.hex()
