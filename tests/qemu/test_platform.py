"""Platform selection (``up --platform``): the pure rule over every combination of facts, the
probe on this machine kind (no TDX, KVM guests abort: PLATFORM.md), and ``up``'s refusal.

Cost: the rule tests are pure (~0.1 s for all); the probe tests each run QEMU once or twice
(~0.1 s each); the ``up`` refusals are one ``pydstack`` process each (~1 s, no nats-server).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from pydstack.adapters.qemu.platform import (
    TDX_PARAM,
    WANTED,
    HostFacts,
    KvmProbe,
    PlatformRefused,
    Wanted,
    choose_platform,
    needs_kvm_probe,
)
from pydstack.adapters.qemu.probe import (
    kvm_probe,
    probe_firmware,
    probe_host,
    qemu_facts,
    resolve_platform,
)
from tests.cli.harness import cli

WITHOUT = frozenset({"sev-guest", "memory-backend-memfd"})
WITH = WITHOUT | {"tdx-guest"}
TDX_PARAMS = (None, "N", "Y")
OBJECTS = (None, WITHOUT, WITH)
PROBES = (None, KvmProbe(ok=True, detail="booted"), KvmProbe(ok=False, detail="qemu aborted"))


def _facts(param: str | None, objects: frozenset[str] | None, kvm: KvmProbe | None) -> HostFacts:
    return HostFacts(tdx_param=param, qemu_objects=objects, qemu_version="7.2.22",
                     qemu_error="" if objects is not None else "not found", kvm=kvm)  # fmt: skip


def _expected(wanted: Wanted, f: HostFacts) -> str | None:
    """The rule, written independently of the code: None means refused."""
    tdx = f.tdx_param == "Y" and f.qemu_objects is not None and "tdx-guest" in f.qemu_objects
    kvm = f.qemu_objects is not None and f.kvm is not None and f.kvm.ok
    if wanted == "tcg":
        return "tcg"
    if wanted == "tdx":
        return "tdx" if tdx else None
    if wanted == "kvm":
        return "kvm" if kvm else None
    return "tdx" if tdx else "kvm" if kvm else "tcg"


ALL = list(itertools.product(WANTED, TDX_PARAMS, OBJECTS, PROBES))


@pytest.mark.parametrize(("wanted", "param", "objects", "kvm"), ALL)
def test_the_rule_over_every_combination_of_facts(
    wanted: Wanted, param: str | None, objects: frozenset[str] | None, kvm: KvmProbe | None
) -> None:
    """Each (asked, tdx param, QEMU objects, KVM probe) gives the platform the issue names,
    or a one-line refusal naming what is missing; every answer says why in one line."""
    facts = _facts(param, objects, kvm)
    want = _expected(wanted, facts)
    if want is None:
        with pytest.raises(PlatformRefused) as exc:
            choose_platform(wanted, facts)
        msg = str(exc.value)
        assert msg.startswith(f"--platform {wanted}: ") and "\n" not in msg
        if wanted == "tdx":
            assert (TDX_PARAM in msg) == (param != "Y")
            assert ("tdx-guest" in msg or "QEMU did not run" in msg) == (objects != WITH)
        return
    choice = choose_platform(wanted, facts)
    assert choice.platform == want
    assert choice.reason and "\n" not in choice.reason
    if wanted == "auto" and want != "tdx":  # auto says why not the better ones
        assert "no TDX" in choice.reason
    if wanted == "auto" and want == "tcg":
        assert "no KVM" in choice.reason


@pytest.mark.parametrize(("wanted", "param", "objects"),
                         list(itertools.product(WANTED, TDX_PARAMS, OBJECTS)))  # fmt: skip
def test_the_kvm_probe_runs_only_when_the_answer_depends_on_it(
    wanted: Wanted, param: str | None, objects: frozenset[str] | None
) -> None:
    """needs_kvm_probe is exactly "the outcome differs between a booting and a failing probe"."""
    outcomes: set[str] = set()
    for kvm in PROBES[1:]:
        try:
            outcomes.add(choose_platform(wanted, _facts(param, objects, kvm)).platform)
        except PlatformRefused:
            outcomes.add("refused")
    depends = len(outcomes) > 1
    facts = _facts(param, objects, None)
    assert needs_kvm_probe(wanted, facts) or not depends
    if not needs_kvm_probe(wanted, facts):  # decided without it: the same answer
        try:
            assert choose_platform(wanted, facts).platform in outcomes
        except PlatformRefused:
            assert outcomes == {"refused"}


def test_the_probe_firmware_reaches_long_mode_under_tcg() -> None:
    """The probe guest itself works (so a KVM failure is KVM's): OK on COM1, debug exit."""
    assert len(probe_firmware()) == 65536
    got = kvm_probe(platform="tcg")
    assert got.ok, got.detail
    assert got.detail.startswith("booted to long mode")


def test_a_hanging_probe_guest_is_bounded_by_the_timeout() -> None:
    got = kvm_probe(platform="tcg", timeout_s=0.001)
    assert not got.ok and "no answer within" in got.detail


def test_a_missing_kvm_device_fails_the_probe_without_running_qemu(tmp_path: Path) -> None:
    got = kvm_probe(device=str(tmp_path / "kvm"))
    assert not got.ok and got.detail.startswith(f"{tmp_path / 'kvm'}: ")


def test_qemu_that_does_not_run_is_a_fact_not_a_crash() -> None:
    objects, version, error = qemu_facts("/nonexistent/qemu-system-x86_64")
    assert objects is None and version == "" and "/nonexistent/qemu-system-x86_64" in error
    assert choose_platform("auto", probe_host("auto", "/nonexistent/qemu")).platform == "tcg"


def test_this_machine_kind_gets_tcg_and_is_told_why() -> None:
    """PLATFORM.md: no kvm_intel TDX parameter, Debian's QEMU 7.2 without tdx-guest, and KVM
    guests abort with -cpu host: auto picks TCG and the reason names all three."""
    facts = probe_host("auto")
    assert facts.tdx_param is None and facts.qemu_objects is not None
    assert "tdx-guest" not in facts.qemu_objects and facts.qemu_version.startswith("7.2")
    assert facts.kvm is not None and not facts.kvm.ok
    choice = resolve_platform("auto")
    assert choice.platform == "tcg", choice
    assert f"{TDX_PARAM} is missing" in choice.reason
    assert "QEMU 7.2" in choice.reason and "has no tdx-guest object" in choice.reason
    assert "the KVM probe guest did not boot" in choice.reason
    assert resolve_platform("auto") is choice  # probed once per process


@pytest.mark.parametrize(
    ("platform", "names"),
    [
        ("tdx", [f"--platform tdx: this host has no TDX: {TDX_PARAM} is missing",
                 "has no tdx-guest object"]),
        ("kvm", ["--platform kvm: the KVM probe guest did not boot"]),
    ],
)  # fmt: skip
def test_up_refuses_a_platform_this_host_lacks_in_one_line(
    tmp_path: Path, platform: str, names: list[str]
) -> None:
    """Before anything starts (no nats-server, no data dir written): one line, what is missing."""
    r = cli(tmp_path / "data", "up", "--vmm", "qemu", "--platform", platform, timeout=30)
    assert r.code == 1, r.out + r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --platform"), r.err
    for name in names:
        assert name in lines[0]
    assert not (tmp_path / "data" / "nats").exists()


def test_up_refuses_a_platform_without_the_qemu_backend(tmp_path: Path) -> None:
    r = cli(tmp_path / "data", "up", "--vmm", "sandbox", "--platform", "tcg", timeout=30)
    assert r.code == 1 and "only with the qemu backend" in r.err, r.err
