"""Which TEE the QEMU image boots on (`pydstack_guest.tee`): the guest's kernel decides where it
can, the host's platform only decides between simulating and failing, and every outcome is
either a ``tee`` stage naming it or one boot-error line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pydstack.adapters.tdx.pki import DevPki
from pydstack_guest.boot import BootFailed, HostShared
from pydstack_guest.tee import TeeFacts, choose_tee, open_td

from .tdx_guest import tdx_guest

SHARED = HostShared(app_compose=b'{"manifest_version":2,"name":"t"}')


def facts(platform: str, configfs: bool, dev_td: bool = False, cpu: bool = False) -> TeeFacts:
    return TeeFacts(platform=platform, configfs_tsm=configfs, dev_td=dev_td, tdx_cpu=cpu)


def refused(f: TeeFacts) -> str:
    with pytest.raises(BootFailed) as e:
        choose_tee(f)
    assert e.value.step == "tee" and "\n" not in str(e.value)
    return e.value.reason


@pytest.mark.parametrize("platform", ["tdx", "tcg", "kvm", "", "sev"])
def test_configfs_tsm_means_tdx_whatever_the_host_says(platform: str) -> None:
    """A kernel with configfs-tsm is a TD: real quotes even if the host claims a simulated
    platform (or none), and an offered dev PKI is said to be ignored."""
    kind, why = choose_tee(facts(platform, configfs=True, dev_td=True))
    assert kind == "tdx" and "dev PKI the host share offers is ignored" in why
    assert ("the kernel wins" in why) == (platform != "tdx")


def test_tdx_platform_without_configfs_tsm_is_never_simulated() -> None:
    """A TDX VM whose kernel has no configfs-tsm fails, even with a simulated TD on offer."""
    why = refused(facts("tdx", configfs=False, dev_td=True))
    assert why.startswith("platform tdx but no configfs-tsm") and "refusing to simulate" in why


@pytest.mark.parametrize("platform", ["tcg", "kvm", ""])
def test_a_td_cpu_without_configfs_tsm_is_never_simulated(platform: str) -> None:
    """The kernel's tdx_guest CPU flag outweighs a host that calls the VM tcg/kvm (or nothing)."""
    why = refused(facts(platform, configfs=False, dev_td=True, cpu=True))
    assert why.startswith("the CPU is a TD (tdx_guest) but no configfs-tsm")


@pytest.mark.parametrize("platform", ["tcg", "kvm"])
def test_a_platform_with_no_tee_is_simulated_and_says_so(platform: str) -> None:
    kind, why = choose_tee(facts(platform, configfs=False, dev_td=True))
    assert kind == "simulated" and f"platform {platform} has no TEE" in why


def test_a_simulated_platform_without_a_dev_td_fails() -> None:
    assert "has no dev-td.json" in refused(facts("tcg", configfs=False))


@pytest.mark.parametrize("platform", ["", "sev", "TDX"])
def test_no_or_unknown_platform_fails(platform: str) -> None:
    """No platform.json (a host that says nothing) or a name we do not know: no guess."""
    why = refused(facts(platform, configfs=False, dev_td=True))
    assert "names platform" in why and "want one of tdx, kvm, tcg" in why


def test_open_td_on_tcg_simulates_with_the_share_dev_pki(tmp_path: Path) -> None:
    """tcg, no configfs-tsm: the simulator with the share's dev PKI, trusting only it; the
    ``tee`` line says simulated and that there is no confidentiality."""
    host_pki = DevPki.generate()
    with tdx_guest(tmp_path, host_pki, platform="tcg", configfs=False, tdx_cpu=False,
                   offer_dev_pki=host_pki) as g:  # fmt: skip
        td = open_td(g.share, SHARED, state_dir=g.state, name="t", vcpu=1, memory_mb=1024,
                     paths=g.paths)  # fmt: skip
    assert td.kind == "simulated" and td.kms_trust.root_ca_der == host_pki.root_der
    assert td.describe().startswith("simulated: platform tcg has no TEE")
    assert "no confidentiality" in td.describe()


def test_open_td_on_tcg_without_the_dev_pki_fails(tmp_path: Path) -> None:
    """dev-td.json without dev-pki/: no PKI is made up in the guest (its quotes would be
    trusted by nobody, and the boot would fail later and less clearly)."""
    with tdx_guest(tmp_path, DevPki.generate(), platform="tcg", configfs=False, tdx_cpu=False,
                   offer_dev_pki=DevPki.generate()) as g:  # fmt: skip
        for f in (g.share / "dev-pki").iterdir():
            f.unlink()
        with pytest.raises(BootFailed, match="no dev-pki/ in the share"):
            open_td(g.share, SHARED, state_dir=g.state, name="t", vcpu=1, memory_mb=1024,
                    paths=g.paths)  # fmt: skip


@pytest.mark.parametrize(
    ("provider", "rtmr_sysfs", "match"),
    [("sev_guest\n", True, "not tdx_guest"), ("tdx_guest\n", False, "needs Linux >= 6.16")],
)
def test_configfs_tsm_that_cannot_serve_a_td_fails_at_tee(
    tmp_path: Path, provider: str, rtmr_sysfs: bool, match: str
) -> None:
    """configfs-tsm of another TEE, or a TDX kernel without the RTMR sysfs: one line at tee."""
    with tdx_guest(tmp_path, DevPki.generate(), platform="tdx", rtmr_sysfs=rtmr_sysfs) as g:
        assert g.kernel is not None
        g.kernel.provider = provider
        with pytest.raises(BootFailed, match=match) as e:
            open_td(g.share, SHARED, state_dir=g.state, name="t", vcpu=1, memory_mb=1024,
                    paths=g.paths)  # fmt: skip
    assert e.value.step == "tee"
