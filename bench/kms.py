"""GetAppKey end to end over loopback mutual RA-TLS vs dcap-qvl verify alone (same quote).

A KMS process (`python -m pydstack.actors.kms`, dev PKI, dev auth backend) serves on loopback
with a real nats-server. Each request is one CVM: its own RA-TLS client certificate, a new
TCP + TLS connection (full mutual handshake, no resumption), the POST, and the answer. The
KMS verifies the quote and event log (dcap-qvl), asks the backend, appends KeyRequested and
then KeyIssued, derives the keys and answers. Timed: from opening the connection to the
parsed answer. Not timed: the CVM's own preparation, done once per boot before it calls the
KMS (key, quote, certificate, and the client TLS context holding them); the context build is
reported apart (`client_setup_p50_ms`: OpenSSL 3.0 spends ~2-4 ms creating a context).
Measured: one client at a time (latency: p50/p99) and 50 concurrent clients (throughput and
latency under load).
The sequential p50 is split into the TCP + mutual TLS handshake as the client sees it
(`connect_p50_ms`: both ends' OpenSSL 3.0, a client certificate carrying a quote and event
log) and the rest. The floor under any RA-TLS request is measured in the same run, interleaved
with the GetAppKey requests: a new mutual RA-TLS connection (a fresh client certificate of the
same kind) and `GetTempCaCert`, which does no work and answers about as much as GetAppKey
(`floor_p50_ms`; not GetMeta, whose ~30 KB answer costs the client's TLS transport ~2 ms more).
In TLS 1.3 the server checks the client's certificate after the client's handshake is over,
so the floor also holds the server's half of the handshake. What GetAppKey adds over that
floor (evidence decode, dcap-qvl, replays, KeyRequested appended while those run, backend,
KeyIssued appended, derivation) is `over_floor_ratio` times dcap-qvl verify alone. Last,
the mutual TLS 1.3 handshake alone (`handshake_alone_p50_ms`): both ends in this process over
memory BIOs, the KMS's server TLS settings and a CVM's RA-TLS client certificate: the CPU no
TLS stack on this OpenSSL avoids.
Last line: {"p50_ms", "p99_ms", "ratio" (p50 / dcap-qvl verify p50), "errors", "attempts",
"error_rate", "ok", "floor_p50_ms", "over_floor_ratio" ((p50 - floor) / verify p50), ...}.
Any failed request (GetAppKey or the floor's) makes the run exit 1: its figures would be
over the survivors only.

    python -m bench.kms [--quick]
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

import aiohttp
import dcap_qvl
from cryptography.hazmat.primitives.asymmetric import ec

from bench._common import bench_signer, finish, parse_quick, percentile, temp_server
from pydstack.actors.kms import KmsClient
from pydstack.actors.kms.client import client_context
from pydstack.actors.kms.http import rpc_ssl_context
from pydstack.actors.kms.service import key_pem, pem
from pydstack.adapters.nats import EventStore
from pydstack.adapters.secretfile import write_secret
from pydstack.adapters.tdx.collateral import collateral_from_json
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import build_ratls_cert
from pydstack_guest import create_dev_app_keys
from tests.images import register_test_image
from tests.kms.conftest import VM_CONFIG, bound_identity, make_cvm


async def one(
    url: str,
    ca: str,
    identity: tuple[str, str],
    setup: list[float],
    connect: list[float],
    method: str = "GetAppKey",
) -> float:
    """One CVM's GetAppKey: ms from connecting to the answer (its TLS context is built first,
    untimed, and its build time appended to `setup`; the TCP + mutual TLS handshake's share
    is appended to `connect`). `method="GetTempCaCert"`: the same connection and an RPC that does
    no work and answers ~2 KB as GetAppKey does: the floor under any RA-TLS request."""
    t = time.perf_counter()
    trace = [_connect_trace(connect)]
    async with KmsClient(url, ca_pem=ca, identity=identity, trace_configs=trace) as c:
        setup.append((time.perf_counter() - t) * 1000)  # the TLS context's build
        t = time.perf_counter()  # the client connects on its first call (one per request)
        if method == "GetTempCaCert":
            meta = await c.call(method)
            ms = (time.perf_counter() - t) * 1000
            if "temp_ca_cert" not in meta:
                raise RuntimeError(f"{method} answered without temp_ca_cert: {sorted(meta)}")
            return ms
        keys = await c.call("GetAppKey", {"api_version": 1, "vm_config": VM_CONFIG})
        ms = (time.perf_counter() - t) * 1000
    if len(keys.get("disk_crypt_key", "")) != 64:
        raise RuntimeError(f"GetAppKey answered without a disk key: {sorted(keys)}")
    return ms


def handshake_alone(identity: tuple[str, str], temp_ca_pem: str, n: int) -> list[float]:
    """ms per mutual TLS handshake, both ends in this process over memory BIOs (no sockets, no
    event loop, no HTTP): the KMS's server TLS settings with a P-256 certificate of its kind,
    the client's context as KmsClient builds it with a CVM's RA-TLS certificate."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    nb, na = now - 60, now + 3600
    ca = build_ratls_cert(ca_key, None, subject="bench CA", ca_path_len=0, not_before=nb,
                          not_after=na)  # fmt: skip
    leaf = build_ratls_cert(key, None, subject="kms", alt_names=["kms"], issuer=(ca, ca_key),
                            usage_server_auth=True, not_before=nb, not_after=na)  # fmt: skip
    server = rpc_ssl_context(pem(leaf) + pem(ca), key_pem(key), temp_ca_pem)
    client = client_context(pem(ca), identity)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        c = client.wrap_bio(c_in, c_out, server_hostname="kms")
        s = server.wrap_bio(s_in, s_out, server_side=True)
        c_done = s_done = False
        while not (c_done and s_done):
            c_done = c_done or _step(c)
            s_in.write(c_out.read())
            s_done = s_done or _step(s)
            c_in.write(s_out.read())
        if s.getpeercert(binary_form=True) is None:
            raise RuntimeError("the server got no client certificate")
        out.append((time.perf_counter() - t) * 1000)
    return out


def _step(side: ssl.SSLObject) -> bool:
    try:
        side.do_handshake()
    except ssl.SSLWantReadError:
        return False
    return True


def _connect_trace(out: list[float]) -> aiohttp.TraceConfig:
    """Times a client's connection set-up (TCP connect + mutual TLS handshake) into ``out``;
    the rest of a request is the HTTP exchange and the KMS's work."""
    started = [0.0]

    async def start(*_: object) -> None:
        started[0] = time.perf_counter()

    async def end(*_: object) -> None:
        out.append((time.perf_counter() - started[0]) * 1000)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(start)
    trace.on_connection_create_end.append(end)
    return trace


async def main(quick: bool) -> int:
    """Run the bench; returns the exit status (1 when any request failed)."""
    n_seq, n_conc, conc = (60, 200, 50) if quick else (300, 1500, 50)
    pki = DevPki.generate()
    async with temp_server() as nats:
        with tempfile.TemporaryDirectory(prefix="pydstack-bench-kms-") as d:
            tmp = Path(d)
            pki.save(tmp / "pki")
            (tmp / "appkeys.json").write_text(create_dev_app_keys(b"\x01" * 20, now=0)[1])
            seed = tmp / "kms-identity.seed"  # the KMS signs with an identity's seed
            write_secret(seed, os.urandom(32).hex())
            proc = subprocess.Popen(
                [sys.executable, "-m", "pydstack.actors.kms", "--nats", nats.url, "--port", "0",
                 "--key-file", str(tmp / "root"), "--seal-appkeys", str(tmp / "appkeys.json"),
                 "--auth", "dev", "--allow-dev-auth", "--dev-pki", str(tmp / "pki"),
                 "--signer-seed-file", str(seed)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            assert proc.stdout is not None
            url = proc.stdout.readline().decode().strip().split("=", 1)[1]
            try:
                # the KMS serves only TDs measured as an image on its log (make_cvm's)
                async with await EventStore.connect(nats.url, bench_signer("admin")) as store:
                    await register_test_image(store)
                async with KmsClient(url, dev_pki=pki) as c:
                    temp = await c.call("GetTempCaCert")
                ca = temp["ca_cert"]
                # One CVM identity per request: each CVM presents its own fresh certificate.
                ids = []
                for i in range(2 * n_seq + n_conc):
                    cvm = make_cvm(pki, instance_id=i.to_bytes(20, "big"))
                    ids.append(await bound_identity(cvm, temp))
                failures: list[str] = []  # every failed request, in words
                seq: list[float] = []
                setup: list[float] = []
                connect: list[float] = []
                floor: list[float] = []  # same connection, no evidence, no log

                async def timed(out: list[float], request: Awaitable[float]) -> None:
                    try:
                        out.append(await request)
                    except Exception as exc:  # counted: any failure fails the run
                        failures.append(f"{type(exc).__name__}: {exc}")

                for i, ident in enumerate(ids[:n_seq]):  # interleaved: both see the same machine
                    await timed(seq, one(url, ca, ident, setup, connect))
                    await timed(floor, one(url, ca, ids[-1 - i], [], [], "GetTempCaCert"))
                sem = asyncio.Semaphore(conc)
                lat: list[float] = []

                async def worker(ident: tuple[str, str]) -> None:
                    async with sem:
                        await timed(lat, one(url, ca, ident, setup, []))

                t0 = time.perf_counter()
                await asyncio.gather(*(worker(i) for i in ids[n_seq : n_seq + n_conc]))
                wall = time.perf_counter() - t0
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
    # dcap-qvl alone on a quote of the same kind, same run.
    cvm = make_cvm(pki)
    quote, _ = cvm.backend.attest(bytes(64))
    coll = collateral_from_json(pki.collateral_json(int(time.time())))
    now = int(time.time())
    for _ in range(50):
        dcap_qvl.verify_with_root_ca(quote, coll, pki.root_der, now)
    vt = []
    for _ in range(300):
        t = time.perf_counter()
        dcap_qvl.verify_with_root_ca(quote, coll, pki.root_der, now)
        vt.append((time.perf_counter() - t) * 1000)
    # The mutual TLS handshake alone, both ends' CPU, same OpenSSL, certificates of the kind.
    hs50 = percentile(handshake_alone(ids[0], temp["temp_ca_cert"], 300), 50)
    p50, p99, v50 = percentile(seq, 50), percentile(seq, 99), percentile(vt, 50)
    c50, f50 = percentile(connect, 50), percentile(floor, 50)
    print(f"sequential   n={len(seq)}  p50 {p50:.2f} ms  p99 {p99:.2f} ms  "
          f"(of which TCP + mutual TLS handshake p50 {c50:.2f} ms)")  # fmt: skip
    print(
        f"floor: new mutual RA-TLS connection + GetTempCaCert (no work) p50 {f50:.2f} ms; "
        f"GetAppKey adds {p50 - f50:.2f} ms = {(p50 - f50) / v50:.2f}x dcap-qvl verify"
    )
    print(f"{conc} clients  n={len(lat)}  p50 {percentile(lat, 50):.2f} ms  "
          f"p99 {percentile(lat, 99):.2f} ms  {len(lat) / wall:.0f} req/s")  # fmt: skip
    print(f"dcap-qvl verify alone p50 {v50:.3f} ms")
    print(f"mutual TLS handshake alone (both ends, in memory, {ssl.OPENSSL_VERSION}) "
          f"p50 {hs50:.2f} ms")  # fmt: skip
    print(f"client TLS context build (untimed) p50 {percentile(setup, 50):.2f} ms")
    attempts = 2 * n_seq + n_conc
    for why in sorted(set(failures))[:5]:
        print(f"failed request: {why}", file=sys.stderr)
    return finish({
        "p50_ms": p50, "p99_ms": p99, "ratio": p50 / v50,
        "c50_p50_ms": percentile(lat, 50), "c50_p99_ms": percentile(lat, 99),
        # answered requests only; with any error the run fails (finish) instead of reporting it
        "c50_rps": len(lat) / wall, "verify_p50_ms": v50,
        "client_setup_p50_ms": percentile(setup, 50), "connect_p50_ms": c50,
        "floor_p50_ms": f50, "handshake_alone_p50_ms": hs50,
        "over_floor_ratio": (p50 - f50) / v50,
    }, errors=len(failures), attempts=attempts, what="bench.kms requests")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_quick(__doc__))))
