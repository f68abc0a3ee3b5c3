"""The RTMR3 runtime events of a boot, named, ordered and encoded as dstack v0.5.11's guest
emits them (dstack-util ``system_setup.rs``: ``measure_app_info``, ``request_app_keys_from_
kms_url``, ``verify_app``, ``setup_fs``). Pure: the boot emits what these return.

1. ``system-preparing`` (empty), ``app-id`` (20 bytes), ``compose-hash`` (32),
   ``instance-id`` (20, or empty with ``no_instance_id``), ``boot-mr-done`` (empty);
2. with a KMS only: ``mr-kms`` (the KMS's ``mr_aggregated``, when its RA-TLS certificate
   carries an attestation), then ``os-image-hash`` (as the KMS's GetAppKey answer gives it);
3. ``key-provider``: serde_json's compact ``{"name":..,"id":..}``, name ``kms`` (id: hex of the
   KMS root CA's SubjectPublicKeyInfo DER), ``local-sgx`` (hex of the local provider's mr) or
   ``none`` (id ``""``); ``tpm`` fails dstack's boot ("not supported"), and ours;
4. ``storage-fs``: ``ext4`` or ``zfs`` in dstack; here ``ext4`` (the QEMU guest's LUKS2 data
   disk) or ``plain`` (pydstack's value: nothing encrypted, see `boot.plan_storage`);
5. ``system-ready`` (empty).

The vectors in ``tests/vectors/dstack/rtmr3/`` come from this order as transcribed from
dstack's source and replayed by dstack-sdk; ``tests/boot/test_rtmr3_dstack.py`` checks these
functions and a booted simulated TD against them.
"""

from __future__ import annotations

import json
from typing import Final

Event = tuple[str, bytes]
KINDS: Final = ("kms", "local", "none")
# dstack-util verify_app: KeyProviderInfo names of KeyProvider::{Kms, Local, None}
PROVIDER_NAMES: Final = {"kms": "kms", "local": "local-sgx", "none": "none"}


def identity_events(
    *, app_id: bytes, compose_hash: bytes, instance_id: bytes
) -> list[Event]:  # fmt: skip
    """Step 1: what a KMS sees before it hands out keys."""
    return [
        ("system-preparing", b""),
        ("app-id", app_id),
        ("compose-hash", compose_hash),
        ("instance-id", instance_id),
        ("boot-mr-done", b""),
    ]


def key_provider_info(kind: str, provider_id: bytes) -> bytes:
    """The ``key-provider`` payload: serde_json's ``KeyProviderInfo`` (compact, name first)."""
    if kind not in KINDS:
        raise ValueError(f"key provider {kind!r} is not supported (want kms, local or none)")
    ident = "" if kind == "none" else provider_id.hex()
    return json.dumps({"name": PROVIDER_NAMES[kind], "id": ident}, separators=(",", ":")).encode()


def key_events(
    kind: str, provider_id: bytes, *, os_image_hash: bytes, mr_kms: bytes | None = None
) -> list[Event]:
    """Steps 2-3, once the keys are in: `mr_kms` None when the KMS certificate carried no
    attestation (dstack then emits nothing for it)."""
    out: list[Event] = []
    if kind == "kms":
        if mr_kms is not None:
            out.append(("mr-kms", mr_kms))
        out.append(("os-image-hash", os_image_hash))
    out.append(("key-provider", key_provider_info(kind, provider_id)))
    return out


def storage_event(fs: str) -> Event:
    return ("storage-fs", fs.encode())


SYSTEM_READY: Final[Event] = ("system-ready", b"")
