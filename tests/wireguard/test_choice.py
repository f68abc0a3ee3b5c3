"""Which WireGuard backend a host gets: the pure rule (every branch), then the probe on this
machine. The probe's answer is checked against `ip link add ... type wireguard` run by the test
itself in a namespace it made; the kernel path runs where the module exists and is skipped
elsewhere with the module's absence named."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pydstack.adapters.wireguard import (
    BackendChoice,
    BackendUnavailable,
    DeviceConfig,
    KernelBackend,
    KernelDevice,
    PrivateKey,
    UserspaceDevice,
    choose_backend,
    pick_backend,
)
from pydstack.adapters.wireguard import netns as ns

NO_MODULE = "no wireguard kernel module: NetlinkError 95 (Operation not supported)"
NO_GO = "wireguard-go not found on PATH (Debian package wireguard-go)"


# -- the rule ---------------------------------------------------------------------------------


def test_auto_prefers_the_kernel() -> None:
    """Both work: the kernel's, whatever wireguard-go could do."""
    assert choose_backend("auto", kernel=None, userspace=None) == BackendChoice(
        "kernel", "auto: the kernel has WireGuard"
    )
    assert choose_backend("auto", kernel=None, userspace=NO_GO).backend == "kernel"


def test_auto_falls_back_to_wireguard_go_and_says_why() -> None:
    """No kernel WireGuard: wireguard-go, the reason carrying the kernel's answer."""
    got = choose_backend("auto", kernel=NO_MODULE, userspace=None)
    assert got == BackendChoice("userspace", f"auto: {NO_MODULE}; wireguard-go")


def test_auto_with_neither_is_refused_naming_both() -> None:
    with pytest.raises(BackendUnavailable) as e:
        choose_backend("auto", kernel=NO_MODULE, userspace=NO_GO)
    assert (
        str(e.value)
        == f"no WireGuard backend on this host: kernel: {NO_MODULE}; userspace: {NO_GO}"
    )


def test_kernel_asked_for_is_taken_or_refused_never_swapped() -> None:
    """--wg-backend kernel: the kernel's although wireguard-go works too; without the module,
    refused with the kernel's reason (wireguard-go is not used instead)."""
    got = choose_backend("kernel", kernel=None, userspace=None)
    assert got == BackendChoice("kernel", "asked for (--wg-backend kernel)")
    with pytest.raises(BackendUnavailable, match=f"^--wg-backend kernel: {re.escape(NO_MODULE)}$"):
        choose_backend("kernel", kernel=NO_MODULE, userspace=None)


def test_userspace_asked_for_is_taken_or_refused_never_swapped() -> None:
    """--wg-backend userspace: wireguard-go although the kernel has WireGuard; without
    wireguard-go, refused with its reason."""
    got = choose_backend("userspace", kernel=None, userspace=None)
    assert got == BackendChoice("userspace", "asked for (--wg-backend userspace): wireguard-go")
    with pytest.raises(BackendUnavailable, match=f"^--wg-backend userspace: {re.escape(NO_GO)}$"):
        choose_backend("userspace", kernel=None, userspace=NO_GO)


# -- the probe, on this machine ---------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, TUN)")


def _kernel_has_wireguard() -> bool:
    """The test's own oracle: can iproute2 make a wireguard link in a fresh namespace?"""
    name = f"pdwgoracle{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        r = subprocess.run(["ip", "-n", name, "link", "add", "wgo", "type", "wireguard"],
                           capture_output=True, text=True)  # fmt: skip
        return r.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def _probe_namespaces() -> list[str]:
    """The probe's scratch namespaces of this process (none may outlive a probe)."""
    netns_dir = Path("/var/run/netns")
    mine = f"pdwgprobe{os.getpid()}-"
    return (
        [p.name for p in netns_dir.iterdir() if p.name.startswith(mine)]
        if netns_dir.exists()
        else []
    )


def _link_details(netns: str, ifname: str) -> str:
    argv = ["ip", "-n", netns, "-d", "link", "show", ifname]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = Path(f"/run/pdwg-{secrets.token_hex(4)}")  # short: unix socket path limit
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_root
async def test_auto_picks_what_this_kernel_offers_and_the_device_works(run_dir: Path) -> None:
    """auto: kernel where iproute2 can make a wireguard link, else wireguard-go with the
    kernel's refusal as the reason; the backend then carries a real device; no scratch
    namespace is left behind."""
    if shutil.which("wireguard-go") is None and not _kernel_has_wireguard():
        pytest.skip("neither a wireguard kernel module nor wireguard-go (Debian wireguard-go)")
    backend, choice = await pick_backend("auto", run_dir=run_dir)
    assert _probe_namespaces() == []
    if _kernel_has_wireguard():
        assert (backend.name, choice.backend) == ("kernel", "kernel"), choice
    else:
        assert (backend.name, choice.backend) == ("userspace", "userspace"), choice
        assert choice.reason.startswith("auto: no wireguard kernel module: NetlinkError "), choice
        assert choice.reason.endswith("; wireguard-go")
    name = f"pdwgc{secrets.token_hex(3)}"
    key = PrivateKey.generate()
    async with ns.temporary_netns(name):
        async with await backend.create("wgc0", name) as dev:
            kind = KernelDevice if choice.backend == "kernel" else UserspaceDevice
            assert isinstance(dev, kind)
            await dev.configure(DeviceConfig(private_key=key, listen_port=51820))
            status = await dev.status()
            assert (status.public_key, status.listen_port) == (key.public_key().b64, 51820)


@needs_root
async def test_kernel_asked_for_is_refused_without_the_module(run_dir: Path) -> None:
    """--wg-backend kernel on a kernel without WireGuard: refused in one line naming the
    missing module, never quietly served by wireguard-go."""
    if _kernel_has_wireguard():
        pytest.skip("this kernel has WireGuard: the refusal cannot happen here")
    with pytest.raises(BackendUnavailable) as e:
        await pick_backend("kernel", run_dir=run_dir)
    assert str(e.value).startswith("--wg-backend kernel: no wireguard kernel module: ")
    assert "\n" not in str(e.value)
    assert _probe_namespaces() == []


@needs_root
async def test_kernel_backend_is_chosen_where_the_module_exists(run_dir: Path) -> None:
    """With the module, auto and kernel both give a kernel wireguard link (iproute2 sees its
    type), and wireguard-go is not started."""
    reason = await KernelBackend().unavailable_reason()
    if reason is not None:  # names what is missing, e.g. "no wireguard kernel module: ..."
        pytest.skip(f"kernel backend unavailable: {reason}")
    backend, choice = await pick_backend("kernel", run_dir=run_dir)
    assert (backend.name, choice.backend) == ("kernel", "kernel")
    auto, why = await pick_backend("auto", run_dir=run_dir)
    assert (auto.name, why.reason) == ("kernel", "auto: the kernel has WireGuard")
    name = f"pdwgk{secrets.token_hex(3)}"
    async with ns.temporary_netns(name):
        async with await backend.create("wgk0", name) as dev:
            assert isinstance(dev, KernelDevice)
            shown = await asyncio.to_thread(_link_details, name, "wgk0")
            assert "wireguard" in shown
    assert not await asyncio.to_thread(run_dir.exists)  # no wireguard-go socket directory
