"""Lean events (issue 18.2): what moving a KMS request's attestation to the evidence bucket costs
the KMS's decision, and what it saves the log, against the inline form in the same run.

    python -m bench.lean_events [--quick]

Two KMS services in one process, on one real nats-server and stream (clusters ``inline`` and
``lean``, `KmsSettings.evidence_blobs` False / True), each fed the same kind of GetAppKey:
a fresh simulated CVM's RA-TLS client certificate (dev PKI), taken by `get_app_key` (evidence
decode, dcap-qvl, replays, image check, dev backend, KeyRequested + blob, KeyIssued,
derivation; no TLS socket: the handshake is the same in both and would only add noise). The
two alternate request by request, so both see the same machine. Timed per request: wall
(`*_p50_ms`, `*_p99_ms`) and this process's CPU (`*_cpu_ms`; the nats-server's is apart).

Sizes are of the stored messages (signed envelope + body): the KMS subject's events, and a
fleet log: per boot, the VM lifecycle events of the bench.replay workload plus that boot's
KMS events (`log_p50_bytes`, `log_p99_bytes`), inline vs lean; and the bucket's bytes per blob.
Last line JSON: {"lean_p50_ms", "inline_p50_ms", "p50_ratio" (lean / inline), "cpu_ratio",
"kms_event_p50_bytes_inline", ..., "log_p99_bytes_lean", "errors", "ok"}.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench._common import bench_signer, finish, parse_quick, percentile, temp_server
from bench.replay import sealed
from pydstack.actors.kms import DevBackend, KmsService, KmsSettings
from pydstack.adapters.nats import EventStore, StreamSettings
from pydstack.adapters.nats.objectstore import EvidenceBucket
from pydstack.adapters.tdx.pki import DevPki
from tests import images
from tests.kms.conftest import CollateralBox, bound_identity, kms_guest, make_cvm

MODES = ("inline", "lean")


def _der(chain_pem: str) -> bytes:
    cert = x509.load_pem_x509_certificate(chain_pem.encode())
    return cert.public_bytes(serialization.Encoding.DER)


async def main(quick: bool) -> int:
    n = 40 if quick else 300
    pki = DevPki.generate()
    wall: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    errors: list[str] = []
    async with temp_server() as nats:
        with tempfile.TemporaryDirectory(prefix="pydstack-bench-lean-") as d:
            tmp = Path(d)
            settings = StreamSettings(deny_delete=False)
            async with await EventStore.connect(
                nats.url, bench_signer("kms"), settings=settings
            ) as store:
                await store.ensure_stream()
                await images.register_test_image(store)
                box = CollateralBox(pki)
                svcs: dict[str, KmsService] = {}
                for mode in MODES:
                    agent, keyfile = kms_guest(pki, tmp, f"kms-{mode}")
                    keyfile.cluster = mode
                    svcs[mode] = await KmsService.open(
                        store,
                        KmsSettings(cluster=mode, root_ca_der=pki.root_der, instance_id=mode,
                                    evidence_blobs=mode == "lean"),
                        backend=DevBackend(enabled=True), collateral=box, keyfile=keyfile,
                        attester=agent,
                    )  # fmt: skip
                ders = {
                    m: [_der((await bound_identity(make_cvm(pki, instance_id=(i + 1).to_bytes(
                        20, "big")), svcs[m].temp_ca()))[0]) for i in range(n)]
                    for m in MODES
                }  # fmt: skip
                async with svcs["inline"], svcs["lean"]:
                    for i in range(n):
                        for mode in MODES if i % 2 else MODES[::-1]:
                            t, c = time.perf_counter(), time.process_time()
                            try:
                                await svcs[mode].get_app_key(ders[mode][i], images.TEST_VM_CONFIG)
                            except Exception as exc:  # counted: any failure fails the run
                                errors.append(f"{mode}: {type(exc).__name__}: {exc}")
                                continue
                            cpu[mode].append((time.process_time() - c) * 1000)
                            wall[mode].append((time.perf_counter() - t) * 1000)
                sizes = {}
                for mode in MODES:
                    recs, _ = await store.read_aggregate(f"dstack.kms.{mode}")
                    sizes[mode] = [len(r.data) for r in recs]
                info = await store.js.stream_info(EvidenceBucket.of(store).stream)
                blob_bytes = info.state.bytes / max(1, info.state.messages // 2)
    # A fleet log: per boot the replay workload's VM lifecycle (~6.5 events) plus its 2 KMS
    # events; same count of boots as GetAppKey requests.
    vm_events = [len(data) for _, data in sealed(int(n * 6.5), bench_signer("vmm"))]
    out: dict[str, float] = {}
    for mode in MODES:
        kms_sizes, log = sizes[mode], vm_events + sizes[mode]
        out |= {
            f"{mode}_p50_ms": percentile(wall[mode], 50),
            f"{mode}_p99_ms": percentile(wall[mode], 99),
            f"{mode}_cpu_ms": percentile(cpu[mode], 50),
            f"kms_event_p50_bytes_{mode}": percentile(kms_sizes, 50),
            f"kms_event_p99_bytes_{mode}": percentile(kms_sizes, 99),
            f"log_p50_bytes_{mode}": percentile(log, 50),
            f"log_p99_bytes_{mode}": percentile(log, 99),
            f"log_mean_bytes_{mode}": sum(log) / len(log),
        }
        print(f"{mode:6} GetAppKey p50 {out[f'{mode}_p50_ms']:.2f} ms  p99 "
              f"{out[f'{mode}_p99_ms']:.2f} ms  cpu p50 {out[f'{mode}_cpu_ms']:.2f} ms; KMS "
              f"events p50 {out[f'kms_event_p50_bytes_{mode}']:.0f} B p99 "
              f"{out[f'kms_event_p99_bytes_{mode}']:.0f} B; fleet log p50 "
              f"{out[f'log_p50_bytes_{mode}']:.0f} B p99 {out[f'log_p99_bytes_{mode}']:.0f} B "
              f"mean {out[f'log_mean_bytes_{mode}']:.0f} B")  # fmt: skip
    print(f"bucket: {blob_bytes:.0f} B stored per blob (chunk + metadata)")
    out |= {
        "p50_ratio": out["lean_p50_ms"] / out["inline_p50_ms"],
        "cpu_ratio": out["lean_cpu_ms"] / out["inline_cpu_ms"],
        "blob_bytes": blob_bytes,
    }
    for why in sorted(set(errors))[:5]:
        print(f"failed request: {why}")
    return finish(out, errors=len(errors), attempts=2 * n, what="bench.lean_events requests")


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_quick(__doc__))))
