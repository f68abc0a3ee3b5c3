"""GetAppKey from a dstack v0.5.11 guest: its RA-TLS client certificate as `generate_ra_cert`
makes it (rcgen's 1975 notBefore, stripped event log, no EKU; `dstack_guest.py`)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import ratls_report_data
from pydstack.core.events import KeyIssued
from pydstack.core.kms import app_key_material

from .conftest import APP_ID, VM_CONFIG, Kms, make_cvm
from .dstack_guest import RCGEN_NOT_AFTER, generate_ra_cert


@pytest.mark.parametrize("not_after", [None, RCGEN_NOT_AFTER], ids=["ra-tls-10y", "rcgen-4096"])
async def test_a_dstack_guests_kms_client_certificate_gets_the_app_keys(
    kms: Kms, pki: DevPki, not_after: int | None
) -> None:
    """The certificate dstack-util presents to GetAppKey (notBefore 1975-01-01, the log
    stripped to its RTMR3 events) is accepted: the keys are the app's, the decision is on
    the log with the attested identity."""
    cvm = make_cvm(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    att = await cvm.attest(ratls_report_data(key.public_key()))
    identity = generate_ra_cert(kms.temp, att, key, not_after=not_after)
    async with kms.client(identity) as c:
        keys = await c.call("GetAppKey", {"api_version": 1, "vm_config": VM_CONFIG})
    want = app_key_material(kms.svc.root, APP_ID, b"\x11" * 20)
    assert keys["disk_crypt_key"] == want.disk_crypt_key.hex()
    assert keys["env_crypt_key"] == want.env_crypt_key.hex()
    issued = (await kms.events())[-1]
    assert isinstance(issued, KeyIssued) and issued.boot_info.app_id == APP_ID.hex()
