"""A host offers its dev PKI to a TDX guest. The PKI's private keys sign "quotes" for any
measurements, so a guest that took them as its trust root would accept a KMS the host
attests itself, and hand its boot to keys the host knows; one that took them as its quote
source would be unprotected without saying so.

The host here does everything it controls: the share carries ``dev-pki/`` and ``dev-td.json``
(as for a TCG VM), ``platform.json`` says ``tdx`` or lies ``tcg``, sys-config's ``pccs_url``
points at a PCCS serving the dev PKI's collateral, and the KMS it names is a real one
attested by that PKI. The guest's kernel has configfs-tsm (emulated, `tests.boot.tdx_guest`):
it boots on configfs-tsm with Intel's root, refuses the KMS at the ``ra-tls`` check before a
request is sent, and the KMS issues nothing. A TDX VM whose kernel lacks configfs-tsm is not
simulated either, nor one whose CPU says it is a TD while the host claims ``tcg``: the
boot stops at ``tee``. (`tests/boot/test_configfs_boot.py` shows the
same KMS accepted by a guest that does trust the dev root: the refusal here is the root.)"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from pydstack.adapters.tdx.devpccs import devpccs_app
from pydstack.adapters.tdx.pki import DevPki
from pydstack.core.events import KeyIssued
from pydstack_guest.boot import BootFailed, HostShared
from pydstack_guest.td_boot import boot_td
from pydstack_guest.tee import open_td
from tests.boot.tdx_guest import Synchronous, tdx_guest
from tests.kms.conftest import VM_CONFIG, Kms, Webhook, kms, pki, webhook

__all__ = ["kms", "pki", "webhook"]  # the KMS suite's fixtures

APP = json.dumps({"manifest_version": 2, "name": "victim", "runner": "docker-compose",
                  "kms_enabled": True}).encode()  # fmt: skip


@pytest.fixture
async def host_pccs(pki: DevPki) -> AsyncIterator[str]:
    """The host's PCCS on loopback, serving its dev PKI's collateral."""
    runner = web.AppRunner(devpccs_app(pki, now=lambda: int(time.time())))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    await runner.cleanup()


@pytest.mark.parametrize("claimed", ["tdx", "tcg"])
async def test_a_tdx_guest_ignores_the_dev_pki_and_refuses_the_hosts_kms(
    kms: Kms, pki: DevPki, webhook: Webhook, host_pccs: str, tmp_path: Path, claimed: str
) -> None:
    """Whatever platform the host claims, a guest with configfs-tsm never reads the offered
    dev PKI: the KMS attested by it fails ``ra-tls`` under Intel's root; no KeyIssued."""
    sysc = {"kms_urls": [kms.url], "vm_config": VM_CONFIG, "pccs_url": host_pccs}
    shared = HostShared(app_compose=APP, sys_config=json.dumps(sysc).encode())
    stages: list[tuple[str, str]] = []
    with tdx_guest(tmp_path, pki, platform=claimed, offer_dev_pki=pki) as g:
        assert g.kernel is not None
        td = await asyncio.to_thread(open_td, g.share, shared, state_dir=g.state, name="v",
                                     vcpu=1, memory_mb=1024, paths=g.paths)  # fmt: skip
        assert td.kind == "tdx" and td.kms_trust.root_ca_der is None
        td = dataclasses.replace(td, backend=Synchronous(td.backend, g.kernel))
        with pytest.raises(BootFailed) as e:
            await boot_td(shared, td, sock=tmp_path / "dstack.sock", dm_crypt=False,
                          report=lambda s, d: stages.append((s, d)))  # fmt: skip
    assert e.value.step == "keys" and "check ra-tls failed" in e.value.reason, e.value
    assert "attestation does not verify" in e.value.reason  # the dev chain under Intel's root
    assert "the dev PKI the host share offers is ignored" in dict(stages)["tee"]
    assert not [x for x in await kms.events() if isinstance(x, KeyIssued)]


@pytest.mark.parametrize(("claimed", "tdx_cpu"), [("tdx", False), ("tdx", True), ("tcg", True)])
def test_a_tdx_vm_without_configfs_tsm_refuses_the_offered_simulator(
    tmp_path: Path, claimed: str, tdx_cpu: bool
) -> None:
    """No configfs-tsm in the guest kernel, a simulated TD on offer, and the VM's platform
    tdx or its CPU a TD (the host claiming tcg): no simulation, one line at ``tee``."""
    host_pki = DevPki.generate()
    with tdx_guest(tmp_path, host_pki, platform=claimed, configfs=False, tdx_cpu=tdx_cpu,
                   offer_dev_pki=host_pki) as g:  # fmt: skip
        with pytest.raises(BootFailed) as e:
            open_td(g.share, HostShared(app_compose=APP), state_dir=g.state, name="v", vcpu=1,
                    memory_mb=1024, paths=g.paths)  # fmt: skip
    assert e.value.step == "tee" and "refusing to simulate a TDX VM" in e.value.reason
