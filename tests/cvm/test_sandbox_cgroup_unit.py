"""What `_cgroup.ensure` writes, on a fake cgroup v1 tree (no root, no kernel; ~10 ms)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pydstack.adapters.sandbox import _cgroup as cgroup


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for h in ("cpu", "cpuacct", "memory"):
        (tmp_path / h).mkdir()
        (tmp_path / h / "cgroup.procs").write_text("")
    monkeypatch.setattr(cgroup, "ROOT", tmp_path)
    return tmp_path


def test_ensure_sets_the_cvms_quota_shares_and_memory(root: Path) -> None:
    """2 vCPUs are two periods of quota per period and twice the default shares; memory_mb is
    the limit, with swap accounting the same (no swap beyond it)."""
    (root / "memory" / "pds-x").mkdir()
    (root / "memory" / "pds-x" / "memory.memsw.limit_in_bytes").write_text("")
    cgroup.ensure("pds-x", vcpu=2, memory_mb=300)
    assert cgroup.limits("pds-x") == (2.0, 300 << 20)
    assert (root / "cpu" / "pds-x" / "cpu.shares").read_text() == "2048\n"
    assert (
        root / "memory" / "pds-x" / "memory.memsw.limit_in_bytes"
    ).read_text() == f"{300 << 20}\n"


def test_ensure_refuses_empty_resources_and_a_host_without_v1_controllers(root: Path) -> None:
    """No quota of 0 and no silent unlimited CVM on a cgroup v2-only host."""
    with pytest.raises(cgroup.CgroupError, match="at least 1 vCPU"):
        cgroup.ensure("pds-x", vcpu=0, memory_mb=256)
    (root / "memory" / "cgroup.controllers").write_text("")  # what a v2 mount has
    with pytest.raises(cgroup.CgroupError, match="no cgroup v1 memory hierarchy"):
        cgroup.ensure("pds-x", vcpu=1, memory_mb=256)
