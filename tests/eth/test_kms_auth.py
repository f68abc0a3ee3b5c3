"""authorize_kms: a KMS replica may join only with an allowed TCB, OS image, MR and device."""

from __future__ import annotations

import msgspec
import pytest

from .conftest import GATEWAY_APP_ID, KMS_MR, OS_IMAGE, Deployment

replace = msgspec.structs.replace

KMS_DEVICE = "0x" + "4d" * 32


@pytest.fixture
def replica(deployed: Deployment) -> Deployment:
    deployed.kms.add_kms_mr(KMS_MR)
    deployed.kms.add_kms_device(KMS_DEVICE)
    boot = replace(deployed.boot, device_id=KMS_DEVICE[2:], compose_hash="", app_id="")
    return Deployment(deployed.flavour, deployed.kms, deployed.app, deployed.backend, boot)


async def test_listed_kms_is_allowed(replica: Deployment) -> None:
    verdict = await replica.backend.authorize_kms(replica.boot)
    assert verdict.is_allowed, verdict.reason
    assert verdict.gateway_app_id == GATEWAY_APP_ID


async def test_kms_with_unlisted_mr_is_refused(replica: Deployment) -> None:
    verdict = await replica.backend.authorize_kms(replace(replica.boot, mr_aggregated="44" * 32))
    assert not verdict.is_allowed
    assert verdict.reason == f"KMS aggregated MR 0x{'44' * 32} not allowed"


async def test_kms_on_unlisted_device_is_refused(replica: Deployment) -> None:
    verdict = await replica.backend.authorize_kms(replace(replica.boot, device_id="de" * 32))
    assert verdict.reason == f"KMS not allowed on device 0x{'de' * 32}"


async def test_kms_with_out_of_date_tcb_is_refused(replica: Deployment) -> None:
    verdict = await replica.backend.authorize_kms(replace(replica.boot, tcb_status="OutOfDate"))
    assert verdict.reason == "TCB status 'OutOfDate' is not up to date"


async def test_kms_on_unlisted_os_image_is_refused(replica: Deployment) -> None:
    verdict = await replica.backend.authorize_kms(replace(replica.boot, os_image_hash="0b" * 32))
    assert verdict.reason == f"os image 0x{'0b' * 32} not allowed"


async def test_removed_kms_mr_and_device_take_effect(replica: Deployment) -> None:
    replica.kms.remove_kms_mr(KMS_MR)
    assert (await replica.backend.authorize_kms(replica.boot)).reason.startswith("KMS aggregated")
    replica.kms.add_kms_mr(KMS_MR)
    replica.kms.remove_kms_device(KMS_DEVICE)
    assert (await replica.backend.authorize_kms(replica.boot)).reason.startswith("KMS not allowed")
    replica.kms.add_kms_device(KMS_DEVICE)
    replica.kms.remove_os_image(OS_IMAGE)
    assert (await replica.backend.authorize_kms(replica.boot)).reason.startswith("os image")


async def test_app_authorization_does_not_admit_a_kms(deployed: Deployment) -> None:
    # The allowed app's boot lists no KMS measurement or device: it is no KMS.
    assert (await deployed.backend.authorize_app(deployed.boot)).is_allowed
    verdict = await deployed.backend.authorize_kms(deployed.boot)
    assert verdict.reason == f"KMS aggregated MR {KMS_MR} not allowed"
