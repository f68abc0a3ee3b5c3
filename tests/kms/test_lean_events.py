"""Lean events (issue 18.2): a KMS request's attestation lives in the evidence bucket by sha256,
the audit fetches and checks every blob; a missing or altered one is an error naming the event."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pydstack.actors.kms import KmsService, KmsSettings, WebhookBackend, serve_kms
from pydstack.actors.kms.refusal import Refused
from pydstack.adapters.nats import EventStore
from pydstack.adapters.nats.objectstore import EvidenceBucket
from pydstack.adapters.tdx.pki import DevPki
from pydstack.cli._evidence import fetch_evidence
from pydstack.cli.audit import recheck_kms
from pydstack.core.events import (
    KeyDenied,
    KeyIssued,
    KeyRequested,
    decode_body,
    open_envelope,
    subject,
)
from pydstack.core.kms import abandoned
from pydstack.core.kms.blobs import lean
from tests import images

from .conftest import CLUSTER, CollateralBox, Kms, Webhook, bound_identity, kms_guest, make_cvm

SUBJ = subject("kms", CLUSTER)


async def _issue(kms: Kms, pki: DevPki) -> dict[str, Any]:
    async with kms.client(await bound_identity(make_cvm(pki), kms.temp)) as c:
        keys: dict[str, Any] = await c.call(
            "GetAppKey", {"api_version": 1, "vm_config": images.TEST_VM_CONFIG}
        )
    return keys  # fmt: skip


async def _kms_records(store: EventStore) -> list[tuple[int, bytes]]:
    recs, _ = await store.read_aggregate(SUBJ)
    return [(r.seq, r.data) for r in recs]


def _requests(recs: list[tuple[int, bytes]]) -> list[tuple[int, KeyRequested]]:
    out = []
    for seq, data in recs:
        ev = decode_body(open_envelope(data))
        if isinstance(ev, KeyRequested):
            out.append((seq, ev))
    return out


async def _audit(store: EventStore, pki_dir: Path) -> list[str]:
    recs = await _kms_records(store)
    blobs, found = await fetch_evidence(store, {SUBJ: recs})
    found += recheck_kms(SUBJ, recs, None, pki_dir, None, blobs)
    return [f.reason for f in found if f.severity == "error"]


@pytest.fixture
def pki_dir(pki: DevPki, tmp_path: Path) -> Path:
    pki.save(tmp_path / "pki")
    return tmp_path / "pki"


async def test_the_request_names_its_attestation_and_the_bucket_holds_it(
    kms: Kms, pki: DevPki, pki_dir: Path
) -> None:
    """The stored KeyRequested is small and carries no attestation; the bucket holds the
    bytes under their sha256 (a standard Object Store entry), and the audit re-checks the
    KeyIssued from them."""
    await _issue(kms, pki)
    recs = await _kms_records(kms.store)
    [(seq, req)] = _requests(recs)
    assert req.attestation == b"" and len(req.attestation_sha256) == 64
    blob = await EvidenceBucket.of(kms.store).get(req.attestation_sha256)
    assert blob is not None and hashlib.sha256(blob).hexdigest() == req.attestation_sha256
    stored = dict(recs)[seq]
    assert len(stored) < 1500 < 4000 < len(blob), (len(stored), len(blob))
    # nats-py's own Object Store client finds it: same metadata layout, its digest the blob's
    os = await kms.store.js.object_store(f"{kms.store.stream}_EVIDENCE")
    info = await os.get_info(req.attestation_sha256)
    assert info.size == len(blob) and info.chunks == 1
    assert (
        info.digest == "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(blob).digest()).decode()
    )
    assert any(isinstance(decode_body(open_envelope(d)), KeyIssued) for _, d in recs)
    assert await _audit(kms.store, pki_dir) == []


async def test_a_deleted_blob_is_an_audit_error_naming_the_request(
    kms: Kms, pki: DevPki, pki_dir: Path
) -> None:
    await _issue(kms, pki)
    [(seq, req)] = _requests(await _kms_records(kms.store))
    bucket = EvidenceBucket.of(kms.store)
    chunk = await kms.store.js.get_last_msg(
        bucket.stream, f"$O.{bucket.bucket}.C.{req.attestation_sha256}"
    )
    await kms.store.js.delete_msg(bucket.stream, chunk.seq or 0)
    errors = await _audit(kms.store, pki_dir)
    want = (f"seq {seq}: {SUBJ}: {req.request_id}: KeyRequested: its attestation blob "
            f"{req.attestation_sha256} is missing from the evidence bucket")  # fmt: skip
    assert want in errors, errors
    # and the decision it backed no longer re-verifies
    assert any("KeyRequested has no attestation to re-check" in e for e in errors), errors


async def test_a_replaced_blob_is_an_audit_error_naming_the_request(
    kms: Kms, pki: DevPki, pki_dir: Path
) -> None:
    """Someone with the server's admin rights puts other bytes under the name: the hash the
    event holds tells them apart."""
    await _issue(kms, pki)
    [(seq, req)] = _requests(await _kms_records(kms.store))
    bucket = EvidenceBucket.of(kms.store)
    chunk_subject = f"$O.{bucket.bucket}.C.{req.attestation_sha256}"
    chunk = await kms.store.js.get_last_msg(bucket.stream, chunk_subject)
    await kms.store.js.delete_msg(bucket.stream, chunk.seq or 0)
    forged = bytes(chunk.data or b"")[:-1] + b"\x00"
    await kms.store.js.publish(chunk_subject, forged)
    errors = await _audit(kms.store, pki_dir)
    want = f"seq {seq}: {SUBJ}: {req.request_id}: KeyRequested: its attestation blob "
    assert any(e.startswith(want) and "was altered" in e for e in errors), errors


async def test_a_stored_name_cannot_be_pointed_at_other_bytes(kms: Kms, pki: DevPki) -> None:
    """Write-once: the server refuses a second message on a blob's chunk or metadata subject,
    so not even the KMS role can substitute a stored blob; a repeated put is a no-op."""
    await _issue(kms, pki)
    [(_, req)] = _requests(await _kms_records(kms.store))
    bucket = EvidenceBucket.of(kms.store)
    blob = await bucket.get(req.attestation_sha256)
    assert blob is not None
    assert await bucket.put(blob) == req.attestation_sha256  # idempotent
    with pytest.raises(nats.js.errors.APIError) as err:
        await kms.store.js.publish(f"$O.{bucket.bucket}.C.{req.attestation_sha256}", b"other")
    assert err.value.err_code == 10077
    meta = await kms.store.js.get_last_msg(bucket.stream, f"$O.{bucket.bucket}.M.>")
    info = json.loads(meta.data or b"{}")
    info["size"] = 5
    with pytest.raises(nats.js.errors.APIError):
        await kms.store.js.publish(meta.subject or "", json.dumps(info).encode())
    assert await bucket.get(req.attestation_sha256) == blob


async def test_evidence_stays_inline_when_blobs_are_off(
    store: EventStore, pki: DevPki, webhook: Webhook, tmp_path: Path, pki_dir: Path
) -> None:
    """`evidence_blobs=False` is the old behaviour, and the audit of inline events (all events
    written before the bucket) is unchanged: no blob asked for, the decision re-checked."""
    box = CollateralBox(pki)
    agent, keyfile = kms_guest(pki, tmp_path, "kms-a")
    await images.register_test_image(store)
    settings = KmsSettings(cluster=CLUSTER, root_ca_der=pki.root_der, instance_id="kms-a",
                           evidence_blobs=False)  # fmt: skip
    svc = await KmsService.open(store, settings, backend=WebhookBackend(webhook.url),
                                collateral=box, keyfile=keyfile, attester=agent)  # fmt: skip
    try:
        async with svc, serve_kms(svc) as url:
            await _issue(Kms(svc, url, store, box, svc.temp_ca()), pki)
    finally:
        assert isinstance(svc.backend, WebhookBackend)
        await svc.backend.close()
    [(_, req)] = _requests(await _kms_records(store))
    assert req.attestation != b"" and req.attestation_sha256 == ""
    assert await _audit(store, pki_dir) == []


async def test_refused_evidence_stores_no_blob(kms: Kms, pki: DevPki) -> None:
    """As for the stream: a request whose evidence does not verify (a debug TD) puts nothing
    into the bucket; the bucket mirrors the stream's deny-delete setting."""
    bucket = EvidenceBucket.of(kms.store)
    chain, _ = await bound_identity(make_cvm(pki, debug=True), kms.temp)
    der = x509.load_pem_x509_certificate(chain.encode()).public_bytes(serialization.Encoding.DER)
    with pytest.raises(Refused):
        await kms.svc.get_app_key(der, images.TEST_VM_CONFIG)
    info = await kms.store.js.stream_info(bucket.stream)
    assert info.state.messages == 0
    main = await kms.store.js.stream_info(kms.store.stream)
    assert info.config.deny_delete == main.config.deny_delete
    assert info.config.max_msgs_per_subject == 1 and info.config.discard_new_per_subject


async def test_a_blob_lost_with_its_kms_is_a_warning_when_the_request_was_abandoned(
    store: EventStore,
) -> None:
    """A KMS that died between the KeyRequested append and the blob's put leaves a request
    its restart closes as ABANDONED (no key left): the missing blob is a warning; the same
    blob missing behind any other decision is an error."""
    subj = "dstack.kms.gone"
    cut, _ = lean(KeyRequested(request_id="r-cut", app_id="a", attestation=b"never stored"))
    kept, _ = lean(KeyRequested(request_id="r-denied", app_id="a", attestation=b"lost too"))
    denied = KeyDenied(request_id="r-denied", reason="backend said no")
    await store.append(subj, [cut, abandoned(cut), kept, denied], 0)
    recs, _ = await store.read_aggregate(subj)
    _, found = await fetch_evidence(store, {subj: [(r.seq, r.data) for r in recs]})
    by_rid = {f.reason.split(": ")[2]: f for f in found}
    assert by_rid["r-cut"].severity == "warning" and "abandoned" in by_rid["r-cut"].reason
    assert by_rid["r-denied"].severity == "error"
    assert "is missing from the evidence bucket" in by_rid["r-denied"].reason
