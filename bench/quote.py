"""Simulator quote generation latency (goal p50 <= 5 ms). Last line: {"p50_ms": ...}.

python -m bench.quote [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time

from pydstack.adapters.tdx.backend import SimulatorBackend
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.simulator import QuoteSimulator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    n = 200 if ap.parse_args().quick else 2000
    t0 = time.perf_counter()
    sim = QuoteSimulator(DevPki.generate())
    setup_ms = (time.perf_counter() - t0) * 1e3
    backend = SimulatorBackend(sim)
    backend.emit_event("app-id", bytes(20))
    times = []
    for i in range(n):
        rd = hashlib.sha512(i.to_bytes(8, "little")).digest()
        t = time.perf_counter()
        backend.get_quote(rd)  # lock + current RTMRs + one ECDSA signature
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    p50 = statistics.median(times)
    p95 = times[int(0.95 * (n - 1))]
    print(f"simulator quote: n={n} p50={p50:.4f} ms p95={p95:.4f} ms (PKI setup {setup_ms:.1f} ms)")
    print(json.dumps({"p50_ms": round(p50, 4), "p95_ms": round(p95, 4), "n": n}))


if __name__ == "__main__":
    main()
