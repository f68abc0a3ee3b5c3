"""Nothing unauthenticated on the permanent log (issue 13): KMS requests whose evidence does not
verify leave a metric and a log line, never an event; what a verified request stores is bounded.

Anyone may fetch the KMS's temp CA and present a certificate under it. Before, every such
request appended a KeyRequested (its whole attestation and vm_config, up to ~1 MiB) to a stream
that is never purged. The flood runs against a real KMS on real NATS (tests/kms's rig): through
the KMS's request handler directly (`KmsService.get_app_key`: what runs once TLS proved the
client holds the certificate's key) at full count, and a few hundred over real mutual TLS.
Counts: `PYDSTACK_KMS_FLOOD` (default 10000) and `PYDSTACK_KMS_FLOOD_TLS` (default 300).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import REGISTRY

from pydstack.actors.kms import KmsClient, make_recheck
from pydstack.adapters.nats import EventStore, NatsServer
from pydstack.adapters.ports import free_port
from pydstack.adapters.secretfile import write_secret
from pydstack.adapters.tdx.eventlog import runtime_tdx_event
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import ratls_report_data
from pydstack.core.events import KeyIssued, KeyRequested
from pydstack.core.kms import audit_kms_log, fold
from pydstack_guest import create_dev_app_keys
from tests.kms import conftest as rig
from tests.kms.conftest import OS_IMAGE, VM_CONFIG, Kms, bound_identity, client_cert, make_cvm

# The KMS rig's fixtures (a KMS with a webhook backend on a real NATS), used here by name.
kms, pki, webhook = rig.kms, rig.pki, rig.webhook

FLOOD = int(os.environ.get("PYDSTACK_KMS_FLOOD", "10000"))
FLOOD_TLS = int(os.environ.get("PYDSTACK_KMS_FLOOD_TLS", "300"))
MR_OWNER_AT = 48 + 232  # quote header + TD report fields before mr_owner: signed, unchecked
Identity = tuple[str, str]  # (chain PEM, key PEM)


def refused_total() -> dict[str, float]:
    """pydstack_kms_refused_total by reason (empty when the metric does not exist)."""
    return {
        s.labels["reason"]: s.value
        for m in REGISTRY.collect()
        if m.name == "pydstack_kms_refused"
        for s in m.samples
        if s.name.endswith("_total")
    }


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {k: int(v - before.get(k, 0)) for k, v in after.items() if v != before.get(k, 0)}


async def stream_state(store: EventStore) -> tuple[int, int]:
    """(last sequence, bytes) of the whole stream."""
    info = await store.js.stream_info(store.stream)
    return int(info.state.last_seq), int(info.state.bytes)


def der_of(identity: Identity) -> bytes:
    cert = x509.load_pem_x509_certificate(identity[0].encode())
    return cert.public_bytes(serialization.Encoding.DER)


async def unverified_identities(kms: Kms, pki: DevPki) -> dict[str, Identity]:
    return await unverified_identities_for(kms.temp, pki)


async def unverified_identities_for(temp: dict[str, Any], pki: DevPki) -> dict[str, Identity]:
    """One client certificate (under the real temp CA) per way evidence fails to verify."""
    cvm = make_cvm(pki)
    out: dict[str, Identity] = {}
    key = ec.generate_private_key(ec.SECP256R1())
    att = await cvm.attest(ratls_report_data(key.public_key()))
    # A genuine quote with one signed byte changed: dcap-qvl's signature check fails.
    q = bytearray(att.quote)
    q[MR_OWNER_AT] ^= 0xFF
    out["quote"] = client_cert(temp, msgspec.structs.replace(att, quote=bytes(q)), key)
    # A genuine, fresh quote copied into a certificate for another key (a replayed quote).
    out["binding"] = client_cert(temp, att, ec.generate_private_key(ec.SECP256R1()))
    # (No "stale" case: a client certificate's notBefore is the client's own claim under the
    # public temp CA, not judged by default since dstack v0.5.11 guests send 1975's; see
    # docs/threat-model.md, "RA-TLS freshness". The replay it stood for is "binding".)
    # A runtime event rewritten with a consistent digest: the log no longer replays to RTMR3.
    log = list(att.event_log)
    i = next(i for i, e in enumerate(log) if e.event == "compose-hash")
    log[i] = runtime_tdx_event("compose-hash", b"\x00" * 32)
    out["event_log"] = client_cert(temp, msgspec.structs.replace(att, event_log=tuple(log)), key)
    # No attestation at all: nothing to verify.
    out["malformed"] = client_cert(temp, None, ec.generate_private_key(ec.SECP256R1()))
    return out


async def pool(jobs: Iterable[Callable[[], Awaitable[str]]], workers: int) -> Counter[str]:
    """Run `jobs` with at most `workers` at once; count what each returned."""
    it, seen = iter(jobs), Counter[str]()

    async def worker() -> None:
        for job in it:
            seen[await job()] += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    return seen


async def test_ten_thousand_unverified_requests_leave_the_stream_unchanged(
    kms: Kms, pki: DevPki
) -> None:
    """FLOOD requests with evidence that does not verify, through the KMS's request handler
    (bad quote, replayed quote, tampered log, none, oversized vm_config):
    each is refused, counted by kind, and the stream's last sequence and size do not move."""
    bad = {kind: der_of(ident) for kind, ident in (await unverified_identities(kms, pki)).items()}
    valid = der_of(await bound_identity(make_cvm(pki), kms.temp))
    big = json.dumps({"os_image_hash": OS_IMAGE.hex(), "pad": "x" * 16384})
    cases = [(kind, der, VM_CONFIG) for kind, der in bad.items()] + [("oversize", valid, big)]
    plan = list(itertools.islice(itertools.cycle(cases), FLOOD))
    state0, metric0 = await stream_state(kms.store), refused_total()

    def job(der: bytes, vm_config: str) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            try:
                await kms.svc.get_app_key(der, vm_config)
            except Exception as e:  # the refusal's kind, as the metric counts it
                return str(getattr(e, "kind", type(e).__name__))
            return "issued"

        return run

    t = time.perf_counter()
    seen = await pool((job(der, cfg) for _, der, cfg in plan), workers=50)
    elapsed = time.perf_counter() - t
    assert await stream_state(kms.store) == state0
    want = Counter(kind for kind, _, _ in plan)
    assert seen == want, seen
    assert delta(metric0, refused_total()) == dict(want)
    assert sum(want.values()) == FLOOD
    print(f"{FLOOD} refusals in {elapsed:.1f} s ({FLOOD / elapsed:.0f}/s)")


async def test_unverified_requests_over_mutual_tls_leave_the_stream_unchanged(
    kms: Kms, pki: DevPki
) -> None:
    """FLOOD_TLS requests over real mutual RA-TLS, each a new connection: the evidence kinds
    above (403), malformed bodies (400), no client certificate (401), an oversized vm_config
    (413): each answered with its kind, counted, and nothing appended."""
    idents = await unverified_identities(kms, pki)
    valid = await bound_identity(make_cvm(pki), kms.temp)
    big = json.dumps({"os_image_hash": OS_IMAGE.hex(), "pad": "x" * 16384})
    get_key = {"api_version": 1, "vm_config": VM_CONFIG}
    cases: list[tuple[str, int, Identity | None, bytes]] = [
        *((kind, 403, ident, json.dumps(get_key).encode()) for kind, ident in idents.items()),
        ("malformed", 400, valid, b'{"api_version": 1, "vm_config": '),
        ("malformed", 400, valid, b'{"vm_config": 7}'),
        ("no_certificate", 401, None, json.dumps(get_key).encode()),
        ("oversize", 413, valid, json.dumps({"api_version": 1, "vm_config": big}).encode()),
    ]
    plan = list(itertools.islice(itertools.cycle(cases), FLOOD_TLS))
    state0, metric0 = await stream_state(kms.store), refused_total()

    def job(kind: str, status: int, ident: Identity | None, body: bytes) -> Callable[[], Any]:
        async def run() -> str:
            async with kms.client(ident) as c:
                got, answer = await c.raw("GetAppKey", body)
            assert got == status, (kind, got, answer)
            return str(answer.get("refused", answer))

        return run

    seen = await pool((job(*case) for case in plan), workers=16)
    assert await stream_state(kms.store) == state0
    want = Counter(kind for kind, *_ in plan)
    assert seen == want, seen
    assert delta(metric0, refused_total()) == dict(want)


async def test_oversized_fields_are_refused_before_verification(kms: Kms, pki: DevPki) -> None:
    """A vm_config over 16 KiB and an attestation over 256 KiB are refused before anything is
    decoded or verified (the collateral source is never asked), even with evidence that would
    verify; a vm_config of exactly 16 KiB is served."""
    asked: list[bytes] = []
    real = kms.svc.collateral

    async def counting(quote: bytes) -> Any:
        asked.append(quote)
        return await real(quote)

    kms.svc.collateral = counting
    state0, metric0 = await stream_state(kms.store), refused_total()
    cvm = make_cvm(pki)
    body = {**json.loads(VM_CONFIG), "pad": ""}
    body["pad"] = "x" * (16384 - len(json.dumps(body)))
    at_limit = json.dumps(body)
    assert len(at_limit.encode()) == 16384
    async with kms.client(await bound_identity(cvm, kms.temp)) as c:
        status, answer = await c.raw(
            "GetAppKey", json.dumps({"api_version": 1, "vm_config": at_limit + " "}).encode()
        )
    assert status == 413 and answer["field"] == "vm_config", answer
    assert "16384" in answer["error"]
    # An attestation over the bound, in a certificate TLS would not even carry (OpenSSL takes
    # ~100 KiB of certificates): given to the handler directly.
    key = ec.generate_private_key(ec.SECP256R1())
    att = await cvm.attest(ratls_report_data(key.public_key()))
    huge = msgspec.structs.replace(att, config="x" * (260 * 1024))
    try:
        await kms.svc.get_app_key(der_of(client_cert(kms.temp, huge, key)), VM_CONFIG)
    except Exception as e:
        assert getattr(e, "kind", None) == "oversize", e
    else:
        raise AssertionError("an attestation over 256 KiB was served")
    assert asked == [] and await stream_state(kms.store) == state0
    assert delta(metric0, refused_total()) == {"oversize": 2}
    async with kms.client(await bound_identity(cvm, kms.temp)) as c:
        keys = await c.call("GetAppKey", {"api_version": 1, "vm_config": at_limit})
    assert len(keys["disk_crypt_key"]) == 64 and len(asked) == 1


async def test_a_valid_request_amid_a_flood_appends_exactly_its_request_and_issue(
    kms: Kms, pki: DevPki
) -> None:
    """While unverified requests pour in, a genuine CVM still gets its keys over mutual RA-TLS,
    and the stream grows by exactly its KeyRequested and KeyIssued, which audit re-verifies."""
    bad = [der_of(i) for i in (await unverified_identities(kms, pki)).values()]
    state0 = await stream_state(kms.store)
    events0 = len(await kms.events())
    ident = await bound_identity(make_cvm(pki), kms.temp)

    def flood_job(der: bytes) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            try:
                await kms.svc.get_app_key(der, VM_CONFIG)
            except Exception as e:
                return type(e).__name__
            return "issued"

        return run

    async def genuine() -> dict[str, Any]:
        async with kms.client(ident) as c:
            return await c.call("GetAppKey", {"api_version": 1, "vm_config": VM_CONFIG})

    flood = pool((flood_job(d) for d in itertools.islice(itertools.cycle(bad), 500)), 20)
    keys, seen = await asyncio.gather(genuine(), flood)
    assert "issued" not in seen and len(keys["disk_crypt_key"]) == 64
    evs = (await kms.events())[events0:]
    assert [type(e) for e in evs] == [KeyRequested, KeyIssued]
    req, issued = evs
    assert isinstance(req, KeyRequested) and isinstance(issued, KeyIssued)
    assert req.request_id == issued.request_id and req.app_id == issued.boot_info.app_id
    seq, _ = await stream_state(kms.store)
    assert seq == state0[0] + 2
    all_events = await kms.events()
    assert not fold(all_events).open_requests
    assert audit_kms_log(all_events, make_recheck(kms.collateral.get, pki.root_der)) == []


async def test_a_kms_process_serves_its_refusals_on_metrics(
    nats_server: NatsServer, store: EventStore, pki: DevPki, tmp_path: Path
) -> None:
    """`python -m pydstack.actors.kms --metrics-port`: a refused request shows on /metrics,
    by kind, and the stream holds only the KMS's root."""
    pki.save(tmp_path / "pki")
    (tmp_path / "appkeys.json").write_text(create_dev_app_keys(b"\x42" * 20, now=0)[1])
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pydstack.actors.kms", "--nats", nats_server.url, "--port", "0",
         "--key-file", str(tmp_path / "root.sealed"), "--seal-appkeys",
         str(tmp_path / "appkeys.json"), "--auth", "dev", "--allow-dev-auth", "--dev-pki",
         str(tmp_path / "pki"), "--metrics-port", str(port), "--signer-seed-file",
         str(write_secret(tmp_path / "kms.seed", os.urandom(32).hex()))],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        url = line.decode().strip().split("=", 1)[1]
        async with KmsClient(url, dev_pki=pki) as c:
            temp = await c.call("GetTempCaCert")
        state0 = await stream_state(store)
        replayed = (await unverified_identities_for(temp, pki))["binding"]
        async with KmsClient(url, ca_pem=temp["ca_cert"], identity=replayed) as c:
            status, answer = await c.raw("GetAppKey", json.dumps({"vm_config": ""}).encode())
        assert status == 403 and answer["refused"] == "binding", answer
        assert await stream_state(store) == state0
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        )
        assert 'pydstack_kms_refused_total{reason="binding"} 1.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 10)
