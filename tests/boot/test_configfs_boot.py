"""The QEMU image's boot on a TDX guest, with configfs-tsm played by an emulated kernel
(`tests.boot.tdx_guest`): `open_td` picks configfs-tsm, the boot's quotes come from inblob /
outblob, and the real KMS verifies them (quote, CCEL boot log + RTMR3 replay, registered
image) before it issues keys. The emulated kernel signs with the KMS's dev PKI, since no
Intel-signed TD exists here; the guest's own choice of trust (Intel's root) is asserted, and
only then replaced by the dev one so the KMS's keys can be accepted at all.

Also: a generation race on the configfs entry stops the boot (no key is asked for with a
quote that may answer another report_data), and `image_boot.run` stops at ``tee`` on a TDX
VM whose kernel has no configfs-tsm before it starts anything."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from pydstack.adapters.tdx.configfs import ConfigfsBackend
from pydstack.adapters.tdx.pki import DevPki
from pydstack.core.events import KeyIssued
from pydstack_guest import image_boot
from pydstack_guest.boot import BootFailed, HostShared
from pydstack_guest.kms_trust import KmsTrust
from pydstack_guest.td_boot import Td, boot_td
from pydstack_guest.tee import open_td
from tests.kms.conftest import OS_IMAGE, VM_CONFIG, Kms, Webhook, kms, pki, webhook

from .tdx_guest import Guest, Synchronous, tdx_guest

__all__ = ["kms", "pki", "webhook"]  # the KMS suite's fixtures


def compose(name: str = "tdx-app") -> bytes:
    doc = {"manifest_version": 2, "name": name, "runner": "docker-compose", "kms_enabled": True}
    return json.dumps(doc).encode()


def host_shared(kms_url: str, app: bytes) -> HostShared:
    sysc = json.dumps({"kms_urls": [kms_url], "vm_config": VM_CONFIG}).encode()
    info = json.dumps({"instance_id_seed": "11" * 20}).encode()
    return HostShared(app_compose=app, sys_config=sysc, instance_info=info)


def allow(webhook: Webhook, app: bytes) -> None:
    h = hashlib.sha256(app).digest()
    webhook.config["apps"][h[:20].hex()] = {"composeHashes": [h.hex()]}


def guest_td(g: Guest, shared: HostShared) -> Td:
    return open_td(g.share, shared, state_dir=g.state, name="tdx-app", vcpu=1, memory_mb=1024,
                   paths=g.paths)  # fmt: skip


async def boot(td: Td, shared: HostShared, sock: Path, stages: list[tuple[str, str]]) -> None:
    booted = await boot_td(shared, td, sock=sock, report=lambda s, d: stages.append((s, d)),
                           dm_crypt=False)  # fmt: skip
    await booted.agent.aclose()


async def issued(k: Kms) -> list[KeyIssued]:
    return [e for e in await k.events() if isinstance(e, KeyIssued)]


async def test_configfs_quotes_get_keys_from_the_real_kms(
    kms: Kms, pki: DevPki, webhook: Webhook, tmp_path: Path
) -> None:
    """The guest picks configfs-tsm and Intel's root on its own; its boot, with every quote
    from the emulated kernel's outblob, gets keys: the KMS recorded KeyIssued for a quote the
    kernel served, for this TD's registered image and app."""
    app = compose()
    allow(webhook, app)
    shared = host_shared(kms.url, app)
    with tdx_guest(tmp_path, pki, platform="tdx") as g:
        assert g.kernel is not None
        td = await asyncio.to_thread(guest_td, g, shared)
        assert td.kind == "tdx" and isinstance(td.backend, ConfigfsBackend)
        assert td.kms_trust.root_ca_der is None  # Intel's root: no dev PKI trusted
        assert td.os_image_hash == OS_IMAGE
        dev = KmsTrust.dev(pki)  # only the test's KMS is attested by a dev PKI
        td = dataclasses.replace(td, backend=Synchronous(td.backend, g.kernel), kms_trust=dev)
        stages: list[tuple[str, str]] = []
        await boot(td, shared, tmp_path / "dstack.sock", stages)
        served = {hashlib.sha256(q).hexdigest() for q in g.kernel.served}
    tee = dict(stages)["tee"]
    assert tee.startswith("tdx: the guest kernel has configfs-tsm") and "provider tdx_guest" in tee
    assert [s for s, _ in stages][:3] == ["tee", "compose", "identity"]
    [key] = await issued(kms)
    assert key.quote_hash in served
    assert key.boot_info.os_image_hash == OS_IMAGE.hex()
    assert key.boot_info.compose_hash == hashlib.sha256(app).hexdigest()


@pytest.mark.parametrize("mode", ["double_bump", "bump_during_read"])
async def test_a_generation_race_stops_the_boot_before_any_key(
    kms: Kms, pki: DevPki, webhook: Webhook, tmp_path: Path, mode: str
) -> None:
    """Another writer on the configfs entry (generation moved by more than our write, or
    while outblob was read): the quote may answer its report_data, so none is sent and the
    boot stops at ``keys`` naming the generation; the KMS issued nothing."""
    app = compose()
    allow(webhook, app)
    shared = host_shared(kms.url, app)
    with tdx_guest(tmp_path, pki, platform="tdx", mode=mode) as g:
        assert g.kernel is not None
        td = await asyncio.to_thread(guest_td, g, shared)
        td = dataclasses.replace(td, backend=Synchronous(td.backend, g.kernel),
                                 kms_trust=KmsTrust.dev(pki))  # fmt: skip
        with pytest.raises(BootFailed) as e:
            await boot(td, shared, tmp_path / "dstack.sock", [])
    assert e.value.step == "keys" and "configfs-tsm generation" in e.value.reason
    assert await issued(kms) == []


async def test_image_boot_stops_at_tee_before_starting_anything(tmp_path: Path) -> None:
    """A TDX VM whose guest kernel has no configfs-tsm: `image_boot.run` raises at ``tee`` in
    one line (main reports it as the error stage), though the host share offers a dev PKI."""
    with tdx_guest(tmp_path, DevPki.generate(), platform="tdx", configfs=False,
                   offer_dev_pki=DevPki.generate()) as g:  # fmt: skip
        (g.share / "app-compose.json").write_bytes(compose())
        with pytest.raises(BootFailed) as e:
            await image_boot.run(asyncio.Event(), share=g.share, tee=g.paths)
    assert e.value.step == "tee" and "\n" not in str(e.value)
    assert "platform tdx but no configfs-tsm" in str(e.value)
    assert "refusing to simulate" in str(e.value)
