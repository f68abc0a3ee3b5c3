"""The evidence bucket: content-addressed blobs in a JetStream Object Store beside the stream.

Large evidence (a KMS request's SCALE attestation: quote, event logs, sys config) is stored
once here, named by the hex sha256 of its bytes, and the event names it by that hash
(``pydstack.core.kms.blobs``). The bucket is a standard Object Store (stream
``OBJ_<bucket>``, chunks on ``$O.<bucket>.C.<id>``, metadata on ``$O.<bucket>.M.<base64 name>``,
the same metadata JSON), so ``nats object get`` reads it too, with three rules of our own:

- **write-once names**: the stream keeps one message per subject and refuses a second
  (``discard_new_per_subject``), with no rollups; the chunk subject is the hash itself. Once
  stored, a name cannot be pointed at other bytes through the server, not even by the KMS.
- **one chunk per blob** (blobs are bounded: an attestation is at most 256 KiB), read with
  direct gets only: readers need no consumer, as for the stream (`identity._reader_api`).
- **who writes** is the write policy's (``core.policy.BLOB_WRITERS``: the KMS role); NATS
  permissions enforce it at publish time.

A put publishes the chunk and the metadata together (two acks in flight, not in turn) and is
idempotent: a blob already stored is found by the server's refusal of the second copy.

    blobs = await EvidenceBucket.ensure(store)         # create if missing (KMS role or admin)
    name = await blobs.put(attestation)                 # == sha256(attestation).hexdigest()
    data = await blobs.get(name)                        # None: missing; check the hash yourself
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from datetime import UTC, datetime
from typing import Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from ._rideout import try_timeout
from ._wire import Acks, request
from .errors import PermissionDenied, StoreError
from .store import EventStore

EVIDENCE_SUFFIX: Final = "_EVIDENCE"
MAX_BLOB: Final = 1024 * 1024  # one chunk; the server's max_payload is 8 MiB (server.py)
_PER_SUBJECT_LIMIT: Final = 10077  # "maximum messages per subject exceeded": already stored
_EXISTS_OTHER_CONFIG: Final = 10058  # a bucket stream created before: take it as it is


def evidence_bucket(stream: str) -> str:
    """The evidence bucket of a stream (``DSTACK`` -> ``DSTACK_EVIDENCE``)."""
    return f"{stream}{EVIDENCE_SUFFIX}"


def bucket_stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


def blob_subjects(bucket: str) -> tuple[str, str]:
    """(chunk subjects, metadata subjects) of a bucket: what a blob writer publishes to."""
    return f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"


def _meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


class BlobError(StoreError):
    """The evidence bucket could not be written or read; the message says which and why."""


class EvidenceBucket:
    def __init__(self, nc: Client, bucket: str, timeout: float = 5.0) -> None:
        self.nc = nc
        self.bucket = bucket
        self.stream = bucket_stream(bucket)
        self.timeout = timeout
        self._acks: Acks | None = None
        self._denials: dict[str, str] = {}

    @classmethod
    def of(cls, store: EventStore) -> EvidenceBucket:
        """The bucket of `store`'s stream, to read (no stream created)."""
        self = cls(store.nc, evidence_bucket(store.stream), store.timeout)
        self._denials = store.denials  # the connection's refused publishes (error callback)
        return self

    @classmethod
    async def ensure(cls, store: EventStore) -> EvidenceBucket:
        """The bucket of `store`'s stream, created if missing with the stream's replicas and
        its deny-delete setting as the server has them (an audit log's evidence is kept as
        long as the log, on as many servers)."""
        self = cls.of(store)
        s = store.settings
        try:
            main = (await store.js.stream_info(store.stream)).config
            replicas, deny = main.num_replicas or s.replicas, bool(main.deny_delete)
        except (nats.js.errors.Error, nats.errors.Error) as exc:
            raise BlobError(f"cannot read stream {store.stream!r} to open its evidence bucket: "
                            f"{exc}") from None  # fmt: skip
        config = StreamConfig(
            name=self.stream,
            description=f"evidence of stream {store.stream}, by sha256 (pydstack)",
            subjects=list(blob_subjects(self.bucket)),
            storage=StorageType.FILE,
            num_replicas=replicas,
            discard=DiscardPolicy.NEW,
            max_msgs_per_subject=1,
            discard_new_per_subject=True,
            allow_rollup_hdrs=False,
            allow_direct=True,
            deny_delete=deny,
            deny_purge=deny,
            duplicate_window=s.duplicate_window_s,
        )
        try:
            await store.js.stream_info(self.stream)
            return self
        except nats.js.errors.NotFoundError:
            pass
        except nats.errors.TimeoutError:
            raise BlobError(f"cannot reach JetStream to open bucket {self.bucket}") from None
        try:
            await store.js.add_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code != _EXISTS_OTHER_CONFIG:
                raise BlobError(f"cannot create evidence bucket {self.bucket}: "
                                f"{exc.description}") from None  # fmt: skip
        except nats.errors.TimeoutError:
            raise BlobError(
                f"cannot create evidence bucket {self.bucket}: no answer (this identity may "
                "not create it: only the KMS role and admin may)"
            ) from None
        return self

    async def put(self, data: bytes) -> str:
        """Store `data` under its sha256 (hex, returned); a blob already there is left as is."""
        if len(data) > MAX_BLOB:
            raise BlobError(f"blob of {len(data)} bytes is over the {MAX_BLOB}-byte limit")
        digest = hashlib.sha256(data).digest()
        name = digest.hex()
        meta = {
            "name": name,
            "bucket": self.bucket,
            "nuid": name,  # the chunk subject is the hash: content-addressed, write-once
            "size": len(data),
            "chunks": 1,
            "mtime": datetime.now(UTC).isoformat(),
            "digest": "SHA-256=" + base64.urlsafe_b64encode(digest).decode(),
        }
        # both on the wire before either ack is awaited: one round trip, not two in turn
        chunk = asyncio.ensure_future(self._send(f"$O.{self.bucket}.C.{name}", data,
                                                 f"blob-c-{name}"))  # fmt: skip
        try:
            await self._send(_meta_subject(self.bucket, name), json.dumps(meta).encode(),
                             f"blob-m-{name}")  # fmt: skip
        except BaseException:
            await asyncio.wait([chunk])
            if not chunk.cancelled():
                chunk.exception()  # retrieved: the metadata's error is the one reported
            raise
        await chunk
        return name

    async def _send(self, subject: str, data: bytes, msg_id: str) -> None:
        if self._acks is None:
            self._acks = Acks(self.nc)
        try:
            await self._acks.publish(subject, data, {"Nats-Msg-Id": msg_id},
                                     try_timeout(self.timeout))  # fmt: skip
        except nats.js.errors.APIError as exc:
            if exc.err_code == _PER_SUBJECT_LIMIT:
                return  # stored before: this name's bytes are already there
            raise BlobError(f"store blob on {subject}: {exc.description}") from None
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
            if subject.lower() in self._denials:
                raise PermissionDenied(subject) from None
            raise BlobError(
                f"store blob on {subject}: no answer ({type(exc).__name__}); is bucket "
                f"{self.bucket} there and may this identity write it (KMS role only)?"
            ) from None

    async def get(self, name: str) -> bytes | None:
        """The bytes stored under `name`, or None when there are none (no metadata, or its
        chunk is gone). The caller checks them against the hash it expects."""
        meta = await self._direct(_meta_subject(self.bucket, name))
        if meta is None:
            return None
        try:
            info = json.loads(meta)
            nuid, size = str(info["nuid"]), int(info.get("size", 0))
        except (ValueError, KeyError, TypeError):
            raise BlobError(f"blob {name}: unreadable metadata in bucket {self.bucket}") from None
        if info.get("deleted"):
            return None
        if size == 0:
            return b""
        return await self._direct(f"$O.{self.bucket}.C.{nuid}")

    async def _direct(self, subject: str) -> bytes | None:
        ask = json.dumps({"last_by_subj": subject}).encode()
        try:
            msg = await request(self.nc, f"$JS.API.DIRECT.GET.{self.stream}", ask, self.timeout)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            raise BlobError(
                f"read {subject}: no answer ({type(exc).__name__}); does bucket {self.bucket} "
                "exist?"
            ) from None
        status = (msg.headers or {}).get("Status", "")
        if status == "404":
            return None
        if status:
            why = (msg.headers or {}).get("Description", status)
            raise BlobError(f"read {subject}: {why}")
        return bytes(msg.data)
