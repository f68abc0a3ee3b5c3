"""Derive a dstack app's identity from a TD report and its runtime events. Pure.

Mirrors dstack's `decode_app_info` for TDX (dstack-attest `attestation.rs`):

- `app_id`, `instance_id`, `compose_hash`, `key_provider_info`: payloads of the first
  `app-id` / `instance-id` / `compose-hash` / `key-provider` runtime event *before*
  `system-ready` (later events are application-controlled and never define identity);
- `mr_system = sha256(mrtd || rtmr0 || rtmr1 || rtmr2 || mr_key_provider)`, where
  `mr_key_provider = sha256(key_provider_info)` or 32 zero bytes when there is none;
- `mr_aggregated = sha256(mrtd || rtmr0-2 || rtmr3')`, with `rtmr3'` replayed from the
  runtime events (up to `boot-mr-done` for the boot-time view), followed by
  `mr_config_id || mr_owner || mr_owner_config` unless all three are zero (old images);
- `device_id = sha256(ppid)`, the PPID of the *verified* PCK certificate (empty before
  verification, as dstack does);
- `os_image_hash` from the VM config (`vm_config` JSON, or the `vm_config` string nested
  in a sys-config JSON).

    info = decode_app_info(quote.report, runtime_events_of(events), config=vm_config_json,
                           ppid=verdict_ppid)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import msgspec
from Crypto.Hash import keccak

from .eventlog import EventLogError, RuntimeEvent, replay_runtime_events

SYSTEM_READY = "system-ready"
BOOT_MR_DONE = "boot-mr-done"
_ZERO48 = bytes(48)

KEY_PROVIDER_KIND_BYTE = {"none": 0, "local": 1, "kms": 2, "tpm": 3}


class TdMeasurements(msgspec.Struct, frozen=True):
    """The TD report fields identity needs (the quote module's `TdReport` has them all)."""

    mr_td: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    mr_config_id: bytes = _ZERO48
    mr_owner: bytes = _ZERO48
    mr_owner_config: bytes = _ZERO48


class AppInfo(msgspec.Struct, frozen=True):
    app_id: bytes
    compose_hash: bytes
    instance_id: bytes
    device_id: bytes
    mr_system: bytes
    mr_aggregated: bytes
    os_image_hash: bytes
    key_provider_info: bytes
    init_script_hashes: tuple[bytes, ...] = ()

    def to_json_obj(self) -> dict[str, object]:
        """Hex for bytes, like dstack's serde form of `AppInfo`."""
        return {
            "app_id": self.app_id.hex(),
            "compose_hash": self.compose_hash.hex(),
            "instance_id": self.instance_id.hex(),
            "device_id": self.device_id.hex(),
            "mr_system": self.mr_system.hex(),
            "mr_aggregated": self.mr_aggregated.hex(),
            "os_image_hash": self.os_image_hash.hex(),
            "key_provider_info": self.key_provider_info.decode("utf-8", "replace"),
            "init_script_hashes": [h.hex() for h in self.init_script_hashes],
        }


def keccak256(data: bytes) -> bytes:
    return keccak.new(digest_bits=256, data=data).digest()


# dstack's KMS bootstrap quote (kms/src/onboard_service.rs `attest_keys`; the spelling is
# dstack's): its report_data is keccak256 of this prefix, the two public keys in hex and
# ";" after each, zero-padded to 64 bytes.
KMS_BOOTSTRAP_PREFIX = b"dstack-kms-genereted-keys-v1:"


def kms_bootstrap_report_data(ca_pubkey: bytes, k256_pubkey: bytes) -> bytes:
    """report_data binding a KMS root: `ca_pubkey` the CA's DER SubjectPublicKeyInfo (rcgen
    `public_key_der`), `k256_pubkey` the compressed SEC1 k256 key (k256 `to_sec1_bytes`)."""
    content = KMS_BOOTSTRAP_PREFIX + ca_pubkey.hex().encode() + b";" + k256_pubkey.hex().encode()
    return keccak256(content + b";").ljust(64, b"\0")


def find_event_payload(events: Sequence[RuntimeEvent], name: str) -> bytes | None:
    """Payload of the first `name` event before `system-ready`, else None."""
    for ev in events:
        if ev.event == SYSTEM_READY:
            break
        if ev.event == name:
            return ev.payload
    return None


def os_image_hash_from_config(config: str) -> bytes:
    """`os_image_hash` of a VM config JSON or of a sys config whose `vm_config` nests one."""
    if not config:
        return b""
    try:
        obj = json.loads(config)
        if isinstance(obj, dict) and isinstance(obj.get("vm_config"), str):
            obj = json.loads(obj["vm_config"])
    except ValueError:
        raise EventLogError("vm config is not JSON") from None
    value = obj.get("os_image_hash", "") if isinstance(obj, dict) else ""
    if not isinstance(value, str):
        raise EventLogError("vm config os_image_hash is not a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise EventLogError("vm config os_image_hash is not hex") from None


def mr_system(td: TdMeasurements, mr_key_provider: bytes) -> bytes:
    return hashlib.sha256(td.mr_td + td.rtmr0 + td.rtmr1 + td.rtmr2 + mr_key_provider).digest()


def mr_aggregated(td: TdMeasurements, rtmr3: bytes) -> bytes:
    h = hashlib.sha256(td.mr_td + td.rtmr0 + td.rtmr1 + td.rtmr2 + rtmr3)
    # dstack adds the config/owner fields only when one is set, so images that predate
    # mr_config_id keep their old mr_aggregated (and thus their KMS-derived keys).
    if (td.mr_config_id, td.mr_owner, td.mr_owner_config) != (_ZERO48, _ZERO48, _ZERO48):
        h.update(td.mr_config_id + td.mr_owner + td.mr_owner_config)
    return h.digest()


def decode_app_info(
    td: TdMeasurements,
    runtime_events: Sequence[RuntimeEvent],
    *,
    config: str = "",
    ppid: bytes = b"",
    boottime_mr: bool = False,
) -> AppInfo:
    """dstack's `AppInfo` of a TDX attestation (see module doc for each field's rule)."""
    kp_info = b"" if boottime_mr else (find_event_payload(runtime_events, "key-provider") or b"")
    mr_kp = hashlib.sha256(kp_info).digest() if kp_info else bytes(32)
    rtmr3 = replay_runtime_events(runtime_events, BOOT_MR_DONE if boottime_mr else None)
    init_hashes: list[bytes] = []
    for ev in runtime_events:
        if ev.event == SYSTEM_READY:
            break
        if ev.event == "init-script-hash":
            init_hashes.append(ev.payload)
    return AppInfo(
        app_id=find_event_payload(runtime_events, "app-id") or b"",
        compose_hash=find_event_payload(runtime_events, "compose-hash") or b"",
        instance_id=find_event_payload(runtime_events, "instance-id") or b"",
        device_id=hashlib.sha256(ppid).digest(),
        mr_system=mr_system(td, mr_kp),
        mr_aggregated=mr_aggregated(td, rtmr3),
        os_image_hash=os_image_hash_from_config(config),
        key_provider_info=kp_info,
        init_script_hashes=tuple(init_hashes),
    )


def measurements_of(report: object) -> TdMeasurements:
    """Take the identity fields from any report struct with dstack's field names."""
    try:
        return TdMeasurements(
            mr_td=bytes(getattr(report, "mr_td")),  # noqa: B009 - duck-typed on purpose
            rtmr0=bytes(getattr(report, "rtmr0")),  # noqa: B009
            rtmr1=bytes(getattr(report, "rtmr1")),  # noqa: B009
            rtmr2=bytes(getattr(report, "rtmr2")),  # noqa: B009
            mr_config_id=bytes(getattr(report, "mr_config_id", _ZERO48)),
            mr_owner=bytes(getattr(report, "mr_owner", _ZERO48)),
            mr_owner_config=bytes(getattr(report, "mr_owner_config", _ZERO48)),
        )
    except AttributeError as e:
        raise EventLogError(f"report lacks a measurement field: {e}") from None


def mr_config_id_v1(compose_hash: bytes) -> bytes:
    """dstack MrConfig V1: `0x01 || compose_hash || zeros` (48 bytes)."""
    return (b"\x01" + compose_hash).ljust(48, b"\x00")[:48]


def mr_config_id_v2(
    compose_hash: bytes, app_id: bytes, key_provider: str, key_provider_id: bytes
) -> bytes:
    """dstack MrConfig V2: `0x02 || keccak256(compose || app_id || kind || kp_id) || zeros`."""
    kind = KEY_PROVIDER_KIND_BYTE[key_provider]
    digest = keccak256(compose_hash + app_id + bytes([kind]) + key_provider_id)
    return (b"\x02" + digest).ljust(48, b"\x00")
