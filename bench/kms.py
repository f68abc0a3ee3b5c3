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

Workers, same run: the KMS above runs as one process (`--workers 1`); its CPU time (user +
system, /proc) over the 50-client phase per answered GetAppKey is `server_cpu_ms`. A second
KMS (another cluster, same nats-server) then runs with one worker per core (`--workers N`,
`workers`) and serves the same 50-client load: `workers_rps`, its `workers_server_cpu_ms`,
and `workers_ratio` = its throughput / the one process's. The clients run on the same cores:
on a 2-core machine they take about as much CPU as the KMS, which bounds the ratio.
`--storm N`: then N simulated CVMs boot at once against the N-worker KMS (each its own quote,
certificate, connection and GetAppKey, none waiting for another): `all_ready_s` (first
connection to the last answer), `storm_errors`; every failed boot counts in `errors` (exit 1).

    python -m bench.kms [--quick] [--storm 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
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

from bench._common import bench_signer, finish, percentile, temp_server
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


def start_kms(
    nats_url: str, tmp: Path, workers: int, cluster: str = "main"
) -> tuple[subprocess.Popen[bytes], str]:
    """A KMS process (dev PKI, dev auth) serving once all its `workers` do; (process, URL)."""
    seed = tmp / "kms-identity.seed"  # the KMS signs with an identity's seed
    if not seed.exists():
        write_secret(seed, os.urandom(32).hex())
    proc = subprocess.Popen(
        [sys.executable, "-m", "pydstack.actors.kms", "--nats", nats_url, "--port", "0",
         "--cluster", cluster, "--key-file", str(tmp / f"root-{cluster}"),
         "--seal-appkeys", str(tmp / "appkeys.json"), "--auth", "dev", "--allow-dev-auth",
         "--dev-pki", str(tmp / "pki"), "--signer-seed-file", str(seed),
         "--workers", str(workers)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    url = proc.stdout.readline().decode().strip().split("=", 1)[1]
    if workers > 1:  # the supervisor says when every worker serves
        line = proc.stdout.readline().decode().strip()
        if line != f"KMS_WORKERS={workers}":
            proc.kill()
            raise RuntimeError(f"the KMS's workers did not all start: {line!r}")
    return proc, url


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and its child processes (a KMS's workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    total = 0
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
    return total / tick


def stop_kms(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)


async def identities(
    pki: DevPki, url: str, n: int, first: int = 0
) -> tuple[str, list[tuple[str, str]]]:
    """(root CA, `n` CVM identities under this KMS's temp CA), one CVM per request."""
    async with KmsClient(url, dev_pki=pki) as c:
        temp = await c.call("GetTempCaCert")
    ids = []
    for i in range(first, first + n):
        ids.append(await bound_identity(make_cvm(pki, instance_id=i.to_bytes(20, "big")), temp))
    return temp["ca_cert"], ids


async def load(
    url: str, ca: str, ids: list[tuple[str, str]], conc: int | None, failures: list[str]
) -> tuple[list[float], float]:
    """Every identity's GetAppKey, `conc` at a time (None: all at once); (latencies, wall s).
    A failed request is appended to `failures` in words."""
    sem = asyncio.Semaphore(conc or len(ids) or 1)
    lat: list[float] = []

    async def boot(ident: tuple[str, str]) -> None:
        async with sem:
            try:
                lat.append(await one(url, ca, ident, [], []))
            except Exception as exc:  # counted: any failure fails the run
                failures.append(f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    await asyncio.gather(*(boot(i) for i in ids))
    return lat, time.perf_counter() - t0


async def workers_run(
    nats_url: str, tmp: Path, pki: DevPki, n: int, conc: int, storm: int, failures: list[str]
) -> dict[str, float]:
    """The same 50-client load on a KMS with one worker per core, then the storm."""
    workers = os.cpu_count() or 1
    proc, url = start_kms(nats_url, tmp, workers, cluster="workers")
    try:
        ca, ids = await identities(pki, url, n + storm, first=1 << 20)
        cpu0 = cpu_seconds(proc.pid)
        lat, wall = await load(url, ca, ids[:n], conc, failures)
        cpu = cpu_seconds(proc.pid) - cpu0
        out = {
            "workers": float(workers), "workers_rps": len(lat) / wall,
            "workers_p99_ms": percentile(lat, 99),
            "workers_server_cpu_ms": cpu * 1000 / max(len(lat), 1),
        }  # fmt: skip
        if storm:
            before = len(failures)
            lat, wall = await load(url, ca, ids[n:], None, failures)
            out |= {"storm": float(storm), "all_ready_s": wall,
                    "storm_p99_ms": percentile(lat, 99),
                    "storm_errors": float(len(failures) - before)}  # fmt: skip
        return out
    finally:
        stop_kms(proc)


async def main(quick: bool, storm: int = 0) -> int:
    """Run the bench; returns the exit status (1 when any request failed)."""
    n_seq, n_conc, conc = (60, 200, 50) if quick else (300, 1500, 50)
    pki = DevPki.generate()
    async with temp_server() as nats:
        with tempfile.TemporaryDirectory(prefix="pydstack-bench-kms-") as d:
            tmp = Path(d)
            pki.save(tmp / "pki")
            (tmp / "appkeys.json").write_text(create_dev_app_keys(b"\x01" * 20, now=0)[1])
            proc, url = start_kms(nats.url, tmp, workers=1)  # one process: the base line
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

                cpu0 = cpu_seconds(proc.pid)
                t0 = time.perf_counter()
                await asyncio.gather(*(worker(i) for i in ids[n_seq : n_seq + n_conc]))
                wall = time.perf_counter() - t0
                server_cpu = cpu_seconds(proc.pid) - cpu0
            finally:
                stop_kms(proc)
            multi = await workers_run(nats.url, tmp, pki, n_conc, conc, storm, failures)
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
    rps1 = len(lat) / wall
    print(f"{conc} clients, {multi['workers']:.0f} workers  {multi['workers_rps']:.0f} req/s "
          f"(x{multi['workers_rps'] / rps1:.2f} of 1 process)  KMS CPU "
          f"{multi['workers_server_cpu_ms']:.2f} ms/request (1 process: "
          f"{server_cpu * 1000 / max(len(lat), 1):.2f})")  # fmt: skip
    if storm:
        print(f"storm: {storm} CVMs booting at once, all answered in "
              f"{multi['all_ready_s']:.2f} s, {multi['storm_errors']:.0f} errors")  # fmt: skip
    attempts = 2 * n_seq + 2 * n_conc + storm
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
        "server_cpu_ms": server_cpu * 1000 / max(len(lat), 1),
        "workers_ratio": multi["workers_rps"] / rps1, **multi,
    }, errors=len(failures), attempts=attempts, what="bench.kms requests")  # fmt: skip


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, finishes in ~40 s")
    ap.add_argument(
        "--storm",
        type=int,
        default=0,
        metavar="N",
        help="then N simulated CVMs boot at once against the N-worker KMS",
    )
    return ap.parse_args()


if __name__ == "__main__":
    a = _args()
    # a storm holds a client socket per CVM at once
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * a.storm + 1024)), hard))
    raise SystemExit(asyncio.run(main(a.quick, a.storm)))
