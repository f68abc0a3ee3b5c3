"""Bench summaries are honest: failures fail the run, every variant is reported."""

from __future__ import annotations

import json
import math

import pytest

from bench._common import emit, finish
from bench._gateway_env import WrkResult, parse_wrk
from bench.append import Results, summary
from bench.gateway import error_rate

WRK_OUT = """Running 3s test @ https://b1-8443s.app.example.test:40000/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20ms  300.00us   9.00ms   90.00%
    Req/Sec    20.00k     1.00k   22.00k    70.00%
  Latency Distribution
     50%    1.10ms
     75%    1.30ms
     90%    1.50ms
     99%    2.50ms
  60000 requests in 3.00s, 9.00MB read
  Socket errors: connect 0, read 30, write 0, timeout 10
  Non-2xx or 3xx responses: 60
Requests/sec:  20000.00
Transfer/sec:      3.00MB
"""


def last_json(out: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return loaded


def test_a_failed_request_fails_the_run_and_its_rate_is_the_last_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One failure in 200: exit status 1, error_rate 0.005 and ok false on the JSON line, and
    a line on stderr saying the figures are over the survivors only."""
    status = finish({"p50_ms": 1.0}, errors=1, attempts=200, what="bench.kms requests")
    out, err = capsys.readouterr()
    assert status == 1
    got = last_json(out)
    assert (got["errors"], got["attempts"], got["error_rate"], got["ok"]) == (1, 200, 0.005, False)
    assert got["p50_ms"] == 1.0
    assert "1 of 200 failed" in err and "not a result" in err


def test_a_clean_run_exits_zero_and_a_run_with_no_request_does_not(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No failure: status 0, ok true; nothing attempted at all is a failure, not a clean run."""
    assert finish({}, errors=0, attempts=10, what="x") == 0
    assert last_json(capsys.readouterr().out)["ok"] is True
    assert finish({}, errors=0, attempts=0, what="x") == 1
    assert last_json(capsys.readouterr().out)["ok"] is False


def test_a_percentile_of_nothing_is_null_in_valid_json(capsys: pytest.CaptureFixture[str]) -> None:
    """NaN is not JSON: the last line stays parseable by a strict parser, with null."""
    emit({"p50_ms": math.nan, "n": 0})
    line = capsys.readouterr().out.strip()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {line}")) == {
        "p50_ms": None,
        "n": 0,
    }


def test_wrk_socket_errors_and_non_2xx_answers_are_counted_against_requests_tried() -> None:
    """60,000 answers of which 60 non-2xx, plus 40 socket errors: 100 failures in 60,040."""
    r = parse_wrk(WRK_OUT)
    assert (r.requests, r.socket_errors, r.errors, r.attempts) == (60_000, 40, 100, 60_040)
    clean = WrkResult(rps=1.0, p99_ms=1.0, errors=0, requests=59_960)
    assert error_rate([r, clean]) == pytest.approx(100 / 120_000)


def test_append_reports_each_variant_and_the_lower_one_as_its_ratio() -> None:
    """Batched appends at 0.1x raw and concurrent ones at 0.8x: both figures are in the
    summary, and the headline ratio is the batched one, named, never the better."""
    r = Results(
        raw_sync_us=[100.0], ours_sync_us=[120.0],
        raw_eps=[10_000.0, 10_000.0], ours_conc_eps=[8_000.0, 8_000.0],
        raw_batch_phase_eps=[9_000.0, 9_000.0], ours_batch_eps=[900.0, 900.0],
        raw_cpu_us=[30.0], ours_cpu_us=[60.0],
    )  # fmt: skip
    s = summary(r)
    assert s["concurrent_ratio"] == pytest.approx(0.8)
    assert s["batched_ratio"] == pytest.approx(0.1)
    assert s["ratio"] == pytest.approx(0.1) and s["ratio_of"] == "batched"
    assert s["ours_concurrent_eps"] == 8_000.0 and s["ours_batched_eps"] == 900.0
