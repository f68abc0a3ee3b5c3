"""Attack: a TD that runs another OS (or another VM shape) claims an allow-listed image.

The KMS used to believe the request's ``os_image_hash`` (host-written ``vm_config``): any TD
replaying a victim's RTMR3 events while naming an allowed image got the victim's keys. Now
the KMS recomputes the named image's MRTD and RTMR0-2 for the claimed shape, from the image an
admin registered on the log, and refuses any difference before its backend is asked; the
KeyDenied names the register. Real KMS, webhook and NATS; simulated TDX.
"""

from __future__ import annotations

import hashlib
import json

import msgspec
import pytest

from pydstack.actors.image_registry import register_image, revoke_image
from pydstack.actors.kms.client import KmsCallError
from pydstack.adapters.tdx.attestation import encode_attestation
from pydstack.adapters.tdx.pki import DevPki
from pydstack.cli.audit import recheck_images
from pydstack.core.events import BootInfo, ImageRegistered, KeyDenied, KeyIssued, KeyRequested
from pydstack.core.measure import VmShape
from pydstack.core.policy import Gate, Refused
from tests import images
from tests.kms import conftest as rig
from tests.kms.conftest import Cvm, Kms, Webhook, bound_identity
from tests.policy.given import ADMIN, VMM1, Log

kms, pki, webhook = rig.kms, rig.pki, rig.webhook  # the KMS rig's fixtures, used by name

EVIL = msgspec.structs.replace(
    images.TEST_PARTS, kernel=hashlib.sha384(b"attacker's kernel").hexdigest()
)


async def ask(kms: Kms, c: Cvm, vm_config: str = images.TEST_VM_CONFIG) -> dict[str, object]:
    async with kms.client(await bound_identity(c, kms.temp)) as client:
        out: dict[str, object] = await client.call("GetAppKey", {"vm_config": vm_config})
    return out


async def denied_for(kms: Kms, c: Cvm, vm_config: str = images.TEST_VM_CONFIG) -> str:
    """The 403's reason; the log holds the request and a KeyDenied with the same reason."""
    with pytest.raises(KmsCallError) as err:
        await ask(kms, c, vm_config)
    assert err.value.status == 403
    events = await kms.events()
    [denied] = [e for e in events if isinstance(e, KeyDenied)]
    assert [e for e in events if isinstance(e, KeyRequested)]
    assert not [e for e in events if isinstance(e, KeyIssued)]
    assert denied.reason in str(err.value)
    return denied.reason


async def test_another_images_td_claiming_the_allowed_image_is_refused_naming_rtmr1(
    kms: Kms, webhook: Webhook
) -> None:
    """The attacker boots its own kernel, replays the app's events and names the allowed
    image (registered, allow-listed by the webhook): refused, the backend never asked."""
    attacker = rig.make_cvm(kms.collateral.pki, parts=EVIL)
    asked = len(webhook.seen)
    reason = await denied_for(kms, attacker)
    assert "RTMR1 is" in reason and "the image gives" in reason
    assert images.TEST_IMAGE.name in reason
    assert len(webhook.seen) == asked  # the backend was not asked


async def test_the_right_image_in_another_shape_than_claimed_is_refused_naming_rtmr0(
    kms: Kms,
) -> None:
    bigger = VmShape(cpu_count=4, memory_size=images.TEST_SHAPE.memory_size)
    td = rig.make_cvm(kms.collateral.pki, shape=bigger)
    reason = await denied_for(kms, td)  # it claims TEST_VM_CONFIG's 1 vCPU
    assert "RTMR0 is" in reason and "1 vCPU, 1024 MiB" in reason


async def test_an_image_nobody_registered_is_refused(kms: Kms) -> None:
    unknown = json.dumps({**json.loads(images.TEST_VM_CONFIG), "os_image_hash": "ab" * 32})
    td = rig.make_cvm(kms.collateral.pki)
    reason = await denied_for(kms, td, unknown)
    assert "is not registered on the log" in reason


async def test_a_revoked_image_gets_no_more_keys(kms: Kms) -> None:
    td = rig.make_cvm(kms.collateral.pki)
    issued = await ask(kms, td)
    assert issued["os_image_hash"] == images.OS_IMAGE.hex()
    [ok] = [e for e in await kms.events() if isinstance(e, KeyIssued)]
    assert "MRTD, RTMR0-2 match for 1 vCPU, 1024 MiB (simulated)" in ok.image_check
    await revoke_image(kms.store, images.TEST_IMAGE.os_image_hash, "CVE-2026-0001")
    with pytest.raises(KmsCallError, match="is not registered on the log"):
        await ask(kms, td)
    # registering it again (a fixed rebuild would have another hash) serves it again
    assert await register_image(kms.store, images.TEST_IMAGE)
    assert (await ask(kms, td))["os_image_hash"] == images.OS_IMAGE.hex()


def test_only_an_admin_registers_or_revokes_an_image() -> None:
    """A host (its VMM key) cannot put its own image on the log: every fold, the KMS's
    included, refuses the event; an image event on another image's subject is refused too."""
    log = Log()
    log.keyring(VMM1)
    h = images.TEST_IMAGE.os_image_hash
    by_host = log.add(VMM1, f"dstack.image.{h}", images.TEST_IMAGE)
    by_admin = log.add(ADMIN, f"dstack.image.{h}", images.TEST_IMAGE)
    other: ImageRegistered = msgspec.structs.replace(images.TEST_IMAGE, os_image_hash="cd" * 32)
    misfiled = log.add(ADMIN, f"dstack.image.{h}", other)
    gate = Gate.pinned(ADMIN.public_key)
    verdicts = {seq: gate.judge(seq, s, d) for seq, s, d in log.records}
    refused = verdicts[by_host]
    assert isinstance(refused, Refused) and refused.reason == "not-allowed"
    assert not isinstance(verdicts[by_admin], Refused)
    assert isinstance(verdicts[misfiled], Refused)


async def test_audit_fails_a_key_issued_without_an_image_check(pki: DevPki) -> None:
    """A KMS (its own key signs) skips the image check and records none: it issues keys to a
    TD booted from another kernel that names the registered image. The audit re-ran only the
    image checks a KeyIssued recorded, so this one passed; now a GetAppKey/SignCert issue
    without a recorded check, on a log that held images when it was decided, is re-checked
    too and fails. An issue of a log that held no image then (before measured images) and a
    replica's GetKmsKey stay as they are."""
    attacker = rig.make_cvm(pki, parts=EVIL)
    att = await attacker.attest(b"\x00" * 64)
    req = KeyRequested(
        request_id="r1", app_id="ab" * 20, method="GetAppKey",
        attestation=encode_attestation(att), vm_config=images.TEST_VM_CONFIG,
    )  # fmt: skip
    boot = BootInfo(tcb_status="UpToDate", os_image_hash=images.TEST_IMAGE.os_image_hash)
    issued = KeyIssued(request_id="r1", boot_info=boot, quote_hash="", backend="dev")
    subj = f"dstack.image.{images.TEST_IMAGE.os_image_hash}"
    held: list[tuple[int, str, object]] = [(1, subj, images.TEST_IMAGE)]
    events: list[tuple[int, object]] = [(5, req), (6, issued)]
    [finding] = recheck_images("dstack.kms.main", events, held, simulated=True)
    assert finding.seq == 6 and "RTMR1 is" in finding.reason, finding
    # before any image was on the log, and for a replica's root keys: not re-checked
    assert recheck_images("dstack.kms.main", events, [(7, subj, images.TEST_IMAGE)], True) == []
    replica = msgspec.structs.replace(req, method="GetKmsKey")
    assert recheck_images("dstack.kms.main", [(5, replica), (6, issued)], held, True) == []
