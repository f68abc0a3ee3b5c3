"""VmStarted.tee from the host's platform: only TDX is a TEE (issue 15.8)."""

from __future__ import annotations

import pytest

from pydstack.core.vmm.tee import tee_of_platform


@pytest.mark.parametrize(("platform", "tee"), [("tdx", "tdx"), ("tcg", "simulated"),
                                               ("kvm", "simulated"), ("sandbox", "simulated"),
                                               ("", "")])  # fmt: skip
def test_only_tdx_is_a_tee(platform: str, tee: str) -> None:
    """KVM without TDX and TCG guests simulate their TD as the sandbox does; unknown stays ""."""
    assert tee_of_platform(platform) == tee


def test_vm_info_shows_the_tee_of_its_last_start() -> None:
    """`vm info` / GetInfo: the tee its last VmStarted recorded; an adoption written before
    the field (tee "") keeps what was known; a VM never started is "unknown"."""
    from pydstack.actors.vmm import vm_info
    from pydstack.core.events import VmScheduled, VmStarted

    from .test_dstack_fields import _fold, _requested

    placed = (_requested(), VmScheduled(vm_id="v1", host="h1", cid=3))
    assert vm_info(_fold(*placed))["tee"] == "unknown"
    started = (*placed, VmStarted(vm_id="v1", host="h1", pid=9, tee="simulated"))
    assert vm_info(_fold(*started))["tee"] == "simulated"
    adopted = (*started, VmStarted(vm_id="v1", host="h1", pid=9, adopted=True))
    assert vm_info(_fold(*adopted))["tee"] == "simulated"
    on_tdx = (*adopted, VmStarted(vm_id="v1", host="h2", pid=4, tee="tdx"))
    assert vm_info(_fold(*on_tdx))["tee"] == "tdx"
