"""Our full verification vs dcap-qvl alone, on the same quote in the same run (goal <= 1.2x).

Ours = parse + dcap-qvl verify + policy (expected MRTD/RTMRs/report_data) + event-log replay.
Measured on the dstack vector (quote-report.json: real Intel quote and its 28-event log) and
on a simulator quote with the dev root. Last line: {"ratio": ..., "ours_p50_ms": ...,
"dcap_p50_ms": ...} for the dstack vector.

    python -m bench.verify [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import dcap_qvl

from pydstack.adapters.tdx.backend import SimulatorBackend
from pydstack.adapters.tdx.collateral import collateral_from_json, load_collateral
from pydstack.adapters.tdx.eventlog import parse_json_event_log
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.quote import parse_quote
from pydstack.adapters.tdx.simulator import QuoteSimulator
from pydstack.adapters.tdx.verify import Policy, verify_quote

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors"
NOW = 1772000000


def compare(
    name: str, ours: Callable[[], object], dcap: Callable[[], object], n: int
) -> dict[str, float]:
    """Median wall time of each side, calls interleaved (alternating which goes first) so
    load from other processes and CPU frequency drift hit both sides alike."""
    for _ in range(min(50, n)):
        ours()
        dcap()
    o: list[float] = []
    d: list[float] = []
    for i in range(n):
        pair = ((ours, o), (dcap, d)) if i % 2 else ((dcap, d), (ours, o))
        for fn, out in pair:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    ours_ms, dcap_ms = statistics.median(o), statistics.median(d)
    print(
        f"{name}: ours p50={ours_ms:.4f} ms, dcap-qvl p50={dcap_ms:.4f} ms, "
        f"ratio={ours_ms / dcap_ms:.3f}"
    )
    return {
        "ratio": round(ours_ms / dcap_ms, 3),
        "ours_p50_ms": round(ours_ms, 4),
        "dcap_p50_ms": round(dcap_ms, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    n = 250 if ap.parse_args().quick else 2000

    report = json.loads((VECTORS / "dstack/quote-report.json").read_text())
    quote = bytes.fromhex(report["quote"])
    coll = load_collateral(VECTORS / "dcap-qvl/tdx_quote_outdated_collateral.json")
    log = parse_json_event_log(report["event_log"])
    r = parse_quote(quote).report
    policy = Policy(
        mr_td=r.mr_td,
        rtmr0=r.rtmr0,
        rtmr1=r.rtmr1,
        rtmr2=r.rtmr2,
        rtmr3=r.rtmr3,
        report_data=bytes.fromhex(report["report_data"]),
    )
    assert verify_quote(quote, coll, policy, NOW, event_log=log).ok

    def ours() -> object:
        v = verify_quote(quote, coll, policy, NOW, event_log=log)
        assert v.ok
        return v

    real = compare("dstack vector", ours, lambda: dcap_qvl.verify(quote, coll, NOW), n)

    pki = DevPki.generate()
    backend = SimulatorBackend(QuoteSimulator(pki))
    backend.emit_event("app-id", bytes(20))
    squote, slog = backend.attest(b"bench")
    scoll = collateral_from_json(pki.collateral_json(NOW))
    root = pki.root_der
    sim_policy = Policy(report_data=b"bench")
    compare(
        "simulator quote",
        lambda: verify_quote(squote, scoll, sim_policy, NOW, root, event_log=slog),
        lambda: dcap_qvl.verify_with_root_ca(squote, scoll, root, NOW),
        n,
    )
    print(json.dumps(real))


if __name__ == "__main__":
    main()
