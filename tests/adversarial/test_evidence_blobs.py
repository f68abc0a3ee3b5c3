"""Attacks on the evidence bucket (issue 18.2) of a real `pydstack up`: only the KMS role may
put blobs (the server refuses every other identity), and a blob deleted or replaced by someone
with the server's admin rights is an audit error naming the KeyRequested that relied on it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from pathlib import Path

import pytest

from pydstack.adapters.nats import EventStore, PermissionDenied
from pydstack.adapters.nats.identity import IdentityStore
from pydstack.adapters.nats.objectstore import EvidenceBucket
from pydstack.core.events import KeyRequested, decode_body, open_envelope
from tests.cli.harness import Up, cli, register_busybox_image
from tests.cli.test_up_kms import guest_gets_keys

BUCKET = "DSTACK_EVIDENCE"
STREAM = f"OBJ_{BUCKET}"


async def _put_as(url: str, home: Path, name: str, data: bytes) -> str:
    ident = IdentityStore(home / "identities").load(name)
    assert ident is not None
    async with await EventStore.connect(url, ident.signer, nkey_seed=ident.seed) as store:
        bucket = EvidenceBucket.of(store)
        bucket.timeout = 1.0
        return await bucket.put(data)


async def _lean_request(url: str, home: Path) -> tuple[int, KeyRequested]:
    admin = IdentityStore(home / "identities").load("admin")
    assert admin is not None
    async with await EventStore.connect(url, admin.signer, nkey_seed=admin.seed) as store:
        recs, _ = await store.read_aggregate("dstack.kms.main")
    reqs = [(r.seq, decode_body(open_envelope(r.data))) for r in recs]
    return next((s, e) for s, e in reqs if isinstance(e, KeyRequested))


async def _rewrite_bucket(url: str, home: Path, name: str, data: bytes | None) -> None:
    """As admin: drop the whole bucket (deny_delete forbids deleting single messages) and,
    with `data`, recreate it holding `data` under `name`: a substitution at the server."""
    admin = IdentityStore(home / "identities").load("admin")
    assert admin is not None
    async with await EventStore.connect(url, admin.signer, nkey_seed=admin.seed) as store:
        config = (await store.js.stream_info(STREAM)).config
        await store.js.delete_stream(STREAM)
        if data is None:
            return
        await store.js.add_stream(config)
        await store.js.publish(f"$O.{BUCKET}.C.{name}", data)
        meta = {"name": name, "bucket": BUCKET, "nuid": name, "size": len(data), "chunks": 1}
        key = base64.urlsafe_b64encode(name.encode()).decode()
        await store.js.publish(f"$O.{BUCKET}.M.{key}", json.dumps(meta).encode())


def test_only_the_kms_writes_blobs_and_audit_names_a_deleted_or_replaced_one(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    plane = Up(home, extra=("--no-gateway", "--kms-auth", "dev")).start()
    try:
        url = plane.ready()["nats_url"]  # type: ignore[index]
        guest_gets_keys(home, tmp_path, register_busybox_image(home))
        assert cli(home, "audit").code == 0
        seq, req = asyncio.run(_lean_request(url, home))
        assert req.attestation == b"" and len(req.attestation_sha256) == 64

        # Every other identity of the data dir is refused by the server; the KMS's is not.
        for name in ("operator", "scheduler", "vmm", "gateway", "auditor"):
            with pytest.raises(PermissionDenied):
                asyncio.run(_put_as(url, home, name, b"forged evidence by " + name.encode()))
        first = asyncio.run(_put_as(url, home, "kms", b"the kms may"))
        assert first == hashlib.sha256(b"the kms may").hexdigest()
        assert asyncio.run(_put_as(url, home, "kms", b"the kms may")) == first  # idempotent
        assert cli(home, "audit").code == 0  # an extra blob nobody names is no finding

        name = req.attestation_sha256
        asyncio.run(_rewrite_bucket(url, home, name, b"not the evidence"))
        r = cli(home, "audit")
        assert r.code == 1, r.out
        want = f"seq {seq}: dstack.kms.main: {req.request_id}: KeyRequested: its attestation blob"
        assert want in r.out and "was altered" in r.out, r.out

        asyncio.run(_rewrite_bucket(url, home, name, None))
        r = cli(home, "audit")
        assert r.code == 1, r.out
        assert f"{want} {name} is missing from the evidence bucket" in r.out, r.out
    finally:
        assert plane.stop() == 0
