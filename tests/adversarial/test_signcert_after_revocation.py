"""Attack: an instance keeps getting SignCert certificates after its image or its compose
version was revoked.

SignCert decisions are re-used per instance and usage for an hour (``certgrants``): a request
whose BootInfo an issue of the window has is answered under it, without a new decision. So
once an admin revoked the image (``ImageRevoked``) or the owner withdrew the compose version
(``AppComposeRevoked``, log backend), an instance that had one SignCert issued before kept
getting new certificates under the app's CA (``GetTlsKey``, its gateway client certificate)
for the rest of the hour, while GetAppKey already refused. Now a re-used issue is checked
again against what the KMS judges from the log itself (the image, the log backend's
composes); a revocation since makes a new decision, which refuses (and is recorded).

Real nats-server, KMS on TLS, simulated TDs of the dev PKI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.actors.image_registry import revoke_image
from pydstack.actors.kms import KmsCallError, KmsService, KmsSettings, serve_kms
from pydstack.actors.kms.log_backend import LogBackend
from pydstack.adapters.nats import NEW, EventStore
from pydstack.adapters.tdx.pki import DevPki
from pydstack.core.events import AppComposeRevoked, AppRegistered, KeyDenied, KeyIssued, subject
from tests import images
from tests.adversarial.test_gateway_admission import sign_cert
from tests.kms import conftest as rig
from tests.kms.conftest import APP_ID, CLUSTER, COMPOSE_HASH, CollateralBox, Kms, kms_guest

kms, pki, webhook = rig.kms, rig.pki, rig.webhook  # the KMS rig's fixtures, used by name


async def signed(kms: Kms, cvm: rig.Cvm) -> int:
    """The status of one SignCert for a fresh key (200: a chain was issued)."""
    try:
        await sign_cert(kms, cvm, ec.generate_private_key(ec.SECP256R1()))
    except KmsCallError as e:
        return e.status
    return 200


async def test_a_revoked_image_gets_no_more_signcert_certificates(kms: Kms, pki: DevPki) -> None:
    cvm = rig.make_cvm(pki, instance_id=b"\x61" * 20)
    assert await signed(kms, cvm) == 200
    assert await signed(kms, cvm) == 200  # the same decision, re-used (control)
    await revoke_image(kms.store, images.TEST_IMAGE.os_image_hash, "CVE-2026-0001")
    assert await signed(kms, cvm) == 403
    assert await signed(kms, cvm) == 403
    events = await kms.events()
    [issued] = [e for e in events if isinstance(e, KeyIssued)]
    [denied] = [e for e in events if isinstance(e, KeyDenied)]  # recorded once, then re-used
    assert "is not registered on the log" in denied.reason
    assert issued.request_id != denied.request_id


@pytest.fixture
async def log_kms(store: EventStore, pki: DevPki, tmp_path: Path) -> AsyncIterator[Kms]:
    """The KMS rig with the log backend (what `up` runs): the app's own events decide."""
    box = CollateralBox(pki)
    agent, keyfile = kms_guest(pki, tmp_path, "kms-log")
    await images.register_test_image(store)
    svc = await KmsService.open(
        store, KmsSettings(cluster=CLUSTER, root_ca_der=pki.root_der, instance_id="kms-log"),
        backend=LogBackend(store), collateral=box, keyfile=keyfile, attester=agent,
    )  # fmt: skip
    async with svc, serve_kms(svc) as url:
        yield Kms(svc, url, store, box, svc.temp_ca())


async def test_a_withdrawn_compose_gets_no_more_signcert_certificates(
    log_kms: Kms, pki: DevPki
) -> None:
    app = APP_ID.hex()
    version = await log_kms.store.append(
        subject("app", app), [AppRegistered(app_id=app, compose_hash=COMPOSE_HASH.hex())], NEW
    )
    cvm = rig.make_cvm(pki, instance_id=b"\x62" * 20)
    assert await signed(log_kms, cvm) == 200
    assert await signed(log_kms, cvm) == 200  # re-used (control)
    await log_kms.store.append(subject("app", app), [AppComposeRevoked(
        app_id=app, compose_hash=COMPOSE_HASH.hex(), reason="CVE-2026-2")], version)  # fmt: skip
    assert await signed(log_kms, cvm) == 403
    assert await signed(log_kms, cvm) == 403
    [denied] = [e for e in await log_kms.events() if isinstance(e, KeyDenied)]
    assert "backend log denied" in denied.reason
