"""End to end on the simulator: keys for an attested, authorized app; every refusal on the log."""

from __future__ import annotations

import time

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.actors.kms import KmsCallError, make_recheck
from pydstack.adapters.tdx.eventlog import runtime_tdx_event
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import ratls_report_data
from pydstack.core.events import KeyDenied, KeyIssued, KeyRequested, KmsRootCreated
from pydstack.core.kms import app_key_material, audit_kms_log, fold
from pydstack_guest.keys import get_key, verify_key_chain

from .conftest import (
    APP_ID,
    OS_IMAGE,
    VM_CONFIG,
    Kms,
    Webhook,
    bound_identity,
    client_cert,
    make_cvm,
)


async def get_app_key(kms: Kms, identity: tuple[str, str]) -> dict[str, object]:
    async with kms.client(identity) as c:
        return await c.call("GetAppKey", {"api_version": 1, "vm_config": VM_CONFIG})


async def refused(kms: Kms, identity: tuple[str, str]) -> KmsCallError:
    with pytest.raises(KmsCallError) as info:
        await get_app_key(kms, identity)
    assert info.value.status == 403
    return info.value


async def test_attested_app_gets_keys_and_the_log_shows_the_decision(kms: Kms, pki: DevPki) -> None:
    """An authorized CVM gets dstack-derived keys; KeyRequested+KeyIssued carry no key."""
    cvm = make_cvm(pki)
    keys = await get_app_key(kms, await bound_identity(cvm, kms.temp))
    want = app_key_material(kms.svc.root, APP_ID, b"\x11" * 20)
    assert keys["disk_crypt_key"] == want.disk_crypt_key.hex()
    assert keys["env_crypt_key"] == want.env_crypt_key.hex()
    assert keys["k256_key"] == want.k256_key.hex()
    assert keys["gateway_app_id"] == "gw-app"
    assert keys["os_image_hash"] == OS_IMAGE.hex()
    # The app key's chain ends at the KMS root the log announced.
    root = next(e for e in await kms.events() if isinstance(e, KmsRootCreated))
    derived, chain = get_key(want.k256_key, want.k256_signature, "p", "x", "secp256k1")
    from pydstack_guest.keys import k256_public

    assert verify_key_chain(k256_public(derived), "x", chain, APP_ID, root.k256_public_key) == []
    evs = await kms.events()
    req, issued = evs[-2], evs[-1]
    assert isinstance(req, KeyRequested) and isinstance(issued, KeyIssued)
    assert req.request_id == issued.request_id and req.method == "GetAppKey"
    assert issued.boot_info.app_id == APP_ID.hex()
    assert issued.boot_info.tcb_status == "UpToDate" and issued.backend == "webhook"
    assert issued.tee == "simulated"  # a dev PKI quote: the decision says so (issue 15.8)


async def test_same_request_twice_gives_same_keys_and_two_decisions(kms: Kms, pki: DevPki) -> None:
    """Keys are a function of root + identity; each request is its own decision on the log."""
    cvm = make_cvm(pki)
    a = await get_app_key(kms, await bound_identity(cvm, kms.temp))
    b = await get_app_key(kms, await bound_identity(cvm, kms.temp))
    assert a == b
    state = fold(await kms.events())
    assert state.issued == 2 and not state.open_requests and not state.duplicates


async def test_unauthorized_compose_hash_is_denied_and_policy_change_applies_next_request(
    kms: Kms, pki: DevPki, webhook: Webhook
) -> None:
    """The webhook's verdict is final; removing a compose hash denies the very next request."""
    other = make_cvm(pki, compose='{"name":"evil"}', app_id=APP_ID)
    err = await refused(kms, await bound_identity(other, kms.temp))
    assert "backend webhook denied: compose hash not allowed" in err.error
    good = make_cvm(pki)
    await get_app_key(kms, await bound_identity(good, kms.temp))
    webhook.config["apps"] = {}
    err = await refused(kms, await bound_identity(good, kms.temp))
    assert "compose hash not allowed" in err.error
    evs = await kms.events()
    denied = [e for e in evs if isinstance(e, KeyDenied)]
    assert [d.request_id for d in denied][-1] == err.request_id
    assert len(denied) == 2 and fold(evs).issued == 1


async def test_debug_td_is_refused(kms: Kms, pki: DevPki, webhook: Webhook) -> None:
    """A debug TD never reaches the backend; dcap-qvl refuses its quote outright, so, like any
    evidence that does not verify, it leaves nothing on the log."""
    before = len(await kms.events())
    err = await refused(kms, await bound_identity(make_cvm(pki, debug=True), kms.temp))
    assert "debug TD refused" in err.error and err.body["refused"] == "quote"
    assert webhook.seen == []
    assert len(await kms.events()) == before


async def test_out_of_date_tcb_is_refused_by_policy(kms: Kms, pki: DevPki) -> None:
    """Collateral saying OutOfDate fails the default policy (UpToDate only)."""
    kms.collateral.status = "OutOfDate"
    err = await refused(kms, await bound_identity(make_cvm(pki), kms.temp))
    assert "tcb status OutOfDate not accepted" in err.error
    last = (await kms.events())[-1]
    assert isinstance(last, KeyDenied) and last.request_id == err.request_id


async def test_quote_not_bound_to_the_tls_key_is_refused(kms: Kms, pki: DevPki) -> None:
    """Evidence quoted for key A inside a certificate for key B."""
    cvm = make_cvm(pki)
    a, b = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    att = await cvm.attest(ratls_report_data(a.public_key()))
    err = await refused(kms, client_cert(kms.temp, att, b))
    assert "does not bind the certificate key" in err.error


async def test_an_old_not_before_is_the_clients_own_claim_and_not_refused(
    kms: Kms, pki: DevPki
) -> None:
    """The temp CA's key is public, so a client certificate's notBefore is whatever its
    holder wrote (dstack v0.5.11's guest: 1975): the KMS does not judge it by default
    (`KmsSettings.max_cert_age`; docs/threat-model.md, "RA-TLS freshness")."""
    cvm = make_cvm(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    att = await cvm.attest(ratls_report_data(key.public_key()))
    old = client_cert(kms.temp, att, key, not_before=int(time.time()) - 2 * 3600)
    keys = await get_app_key(kms, old)
    assert keys["gateway_app_id"] == "gw-app"


async def test_tampered_event_log_is_refused(kms: Kms, pki: DevPki) -> None:
    """A runtime event rewritten after quoting no longer replays to the quote's RTMR3."""
    cvm = make_cvm(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    att = await cvm.attest(ratls_report_data(key.public_key()))
    log = list(att.event_log)
    i = next(i for i, e in enumerate(log) if e.event == "compose-hash")
    log[i] = msgspec.structs.replace(log[i], event_payload=b"\x00" * 32)
    tampered = msgspec.structs.replace(att, event_log=tuple(log))
    err = await refused(kms, client_cert(kms.temp, tampered, key))
    assert "'compose-hash'" in err.error and "not sha384 of its name and payload" in err.error
    # Consistent digest for the forged payload: the log then no longer replays to RTMR3.
    log[i] = runtime_tdx_event("compose-hash", b"\x00" * 32)
    tampered = msgspec.structs.replace(att, event_log=tuple(log))
    err = await refused(kms, client_cert(kms.temp, tampered, key))
    assert "rtmr3" in err.error.lower(), err.error


async def test_unavailable_collateral_is_a_503_naming_the_cause_and_appends_nothing(
    kms: Kms, pki: DevPki
) -> None:
    """A check that cannot run (PCCS down) verified nothing: the client learns why and may
    retry, the log gets nothing; once the PCCS answers the same CVM gets its keys."""
    before = len(await kms.events())
    kms.collateral.unavailable = True
    with pytest.raises(KmsCallError) as info:
        await get_app_key(kms, await bound_identity(make_cvm(pki), kms.temp))
    assert info.value.status == 503 and info.value.body["refused"] == "collateral_unavailable"
    assert "collateral unavailable" in info.value.error and "pccs.test" in info.value.error
    assert len(await kms.events()) == before
    kms.collateral.unavailable = False
    await get_app_key(kms, await bound_identity(make_cvm(pki), kms.temp))
    evs = await kms.events()
    req, issued = evs[-2], evs[-1]
    assert isinstance(req, KeyRequested) and isinstance(issued, KeyIssued)
    # The ids the request records are the verified ones (its runtime events replayed).
    assert req.app_id == APP_ID.hex() and req.instance_id == (b"\x11" * 20).hex()
    assert not fold(evs).open_requests


async def test_a_derivation_failure_still_closes_the_logged_request(
    kms: Kms, pki: DevPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys are derived while the request travels to the log: if that fails, the request
    is closed with a KeyDenied naming the cause, never left open or issued without keys."""

    def broken(boot: object) -> None:
        raise ValueError("derivation exploded")

    monkeypatch.setattr(kms.svc, "_app_keys", broken)
    err = await refused(kms, await bound_identity(make_cvm(pki), kms.temp))
    assert "could not derive the keys" in err.error and "exploded" in err.error
    evs = await kms.events()
    req, denied = evs[-2], evs[-1]
    assert isinstance(req, KeyRequested) and isinstance(denied, KeyDenied)
    assert req.request_id == denied.request_id == err.request_id
    assert not fold(evs).open_requests


async def test_malformed_requests_get_400_and_append_nothing(kms: Kms, pki: DevPki) -> None:
    """Bad JSON or a wrong field type is a caller error: 400 naming the field, no events."""
    before = len(await kms.events())
    identity = await bound_identity(make_cvm(pki), kms.temp)
    async with kms.client(identity) as c:
        status, body = await c.raw("GetAppKey", b'{"api_version": 1, "vm_config": ')
        assert status == 400 and "not JSON" in body["error"]
        status, body = await c.raw("GetAppKey", b'{"vm_config": 7}')
        assert status == 400 and body["field"] == "vm_config"
        status, body = await c.raw("GetAppEnvEncryptPubKey", b'{"app_id": "abcd"}')
        assert status == 400 and body["field"] == "app_id"
    assert len(await kms.events()) == before


async def test_no_secret_on_the_stream_and_audit_rechecks_every_issue(
    kms: Kms, pki: DevPki
) -> None:
    """Scan every stored byte for key material; the auditor re-verifies each KeyIssued."""
    cvm = make_cvm(pki)
    keys = await get_app_key(kms, await bound_identity(cvm, kms.temp))
    await refused(kms, await bound_identity(make_cvm(pki, debug=True), kms.temp))
    records, _ = await kms.store.read_aggregate("dstack.kms.test")
    blob = b"".join(r.data for r in records)
    root = kms.svc.root
    secrets = [
        root.k256, root.ca_scalar.to_bytes(32, "big"),
        *(bytes.fromhex(str(keys[k])) for k in ("disk_crypt_key", "env_crypt_key", "k256_key")),
    ]  # fmt: skip
    for s in secrets:
        assert s not in blob and s.hex().encode() not in blob
    evs = await kms.events()
    recheck = make_recheck(kms.collateral.get, pki.root_der)
    assert audit_kms_log(evs, recheck) == []
    # A forged record (BootInfo changed after the fact) is caught.
    i = next(i for i, e in enumerate(evs) if isinstance(e, KeyIssued))
    bi = msgspec.structs.replace(evs[i].boot_info, compose_hash="00" * 32)
    evs[i] = msgspec.structs.replace(evs[i], boot_info=bi)
    assert any("BootInfo differs" in p for p in audit_kms_log(evs, recheck))
