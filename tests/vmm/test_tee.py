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
