"""The simulator's measurement rule: each input moves exactly the registers it should, and a
simulated TD's quote carries what the KMS recomputes from the image on the log."""

from __future__ import annotations

import hashlib

import msgspec
import pytest

from pydstack.adapters.tdx.backend import measured_simulator
from pydstack.adapters.tdx.eventlog import replay_rtmrs
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.quote import parse_quote
from pydstack.adapters.tdx.simulator import QuoteSimulator
from pydstack.core.measure import ImageParts, VmShape, simulated_measurements


def _d(label: str) -> str:
    return hashlib.sha384(label.encode()).hexdigest()


PARTS = ImageParts(firmware=_d("fw"), kernel=_d("kernel"), initrd=_d("initrd"), cmdline="ro")
SHAPE = VmShape(cpu_count=2, memory_size=2 << 30)
FIELDS = ("mr_td", "rtmr0", "rtmr1", "rtmr2")


def _changed(parts: ImageParts = PARTS, shape: VmShape = SHAPE) -> set[str]:
    a, b = simulated_measurements(PARTS, SHAPE), simulated_measurements(parts, shape)
    return {f for f in FIELDS if getattr(a, f) != getattr(b, f)}


def test_the_same_image_and_shape_always_measure_the_same() -> None:
    assert simulated_measurements(PARTS, SHAPE) == simulated_measurements(PARTS, SHAPE)
    assert _changed() == set()


@pytest.mark.parametrize(
    ("change", "moved"),
    [
        ({"firmware": _d("other fw")}, {"mr_td", "rtmr0"}),
        ({"kernel": _d("other kernel")}, {"rtmr1"}),
        ({"initrd": _d("other initrd")}, {"rtmr2"}),
        ({"cmdline": "ro debug"}, {"rtmr2"}),
    ],
)
def test_each_image_part_moves_its_own_registers(change: dict[str, str], moved: set[str]) -> None:
    assert _changed(parts=msgspec.structs.replace(PARTS, **change)) == moved


@pytest.mark.parametrize(
    ("change", "moved"),
    [
        ({"cpu_count": 4}, {"rtmr0"}),
        ({"memory_size": 4 << 30}, {"rtmr0", "rtmr1"}),
        ({"num_gpus": 1}, {"rtmr0"}),
        ({"hugepages": True}, {"rtmr0"}),
    ],
)
def test_the_vm_shape_moves_rtmr0_and_memory_rtmr1(
    change: dict[str, object], moved: set[str]
) -> None:
    assert _changed(shape=msgspec.structs.replace(SHAPE, **change)) == moved


def test_a_measured_simulator_quotes_the_rules_values_and_its_log_replays_to_them() -> None:
    backend = measured_simulator(QuoteSimulator(DevPki.generate()), PARTS, SHAPE)
    quote, log = backend.attest(bytes(64))
    report = parse_quote(quote).report
    want = simulated_measurements(PARTS, SHAPE)
    got = (bytes(report.mr_td), bytes(report.rtmr0), bytes(report.rtmr1), bytes(report.rtmr2))
    assert got == (want.mr_td, want.rtmr0, want.rtmr1, want.rtmr2)
    assert replay_rtmrs(log)[:3] == got[1:]


def test_bad_part_digests_are_named() -> None:
    assert PARTS.problem() is None
    assert "kernel digest" in (msgspec.structs.replace(PARTS, kernel="ab").problem() or "")
    upper = msgspec.structs.replace(PARTS, initrd=_d("x").upper())
    assert "initrd digest" in (upper.problem() or "")
