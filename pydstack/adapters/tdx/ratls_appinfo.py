"""The AppInfo certificate extension (1.3.6.1.4.1.62397.1.9) as dstack's ra-tls writes it.

dstack's `CertRequest` serializes `AppInfo` with `rmp_serde::to_vec`: a MessagePack array of
the struct's fields in order, each a `bin` (`serde_human_bytes` is not human-readable there).
v0.5.11 has eight fields; dstack's unreleased main adds a ninth (`init_script_hashes`, an
array of bins), which a v0.5.11 reader refuses, so we write it only when it is non-empty.

The extension is client-supplied bytes (a CVM's certificate): decoding is bounded
(`MAX_APP_INFO`, fixed-length measurements) and fails with `AppInfoDecodeError`. Its content
is only the signer's statement: trust it from a chain to a KMS root, never from the bytes.

    raw = encode_app_info(info)
    assert decode_app_info_ext(raw) == info
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from .errors import TdxError
from .identity import AppInfo

MAX_APP_INFO: Final = 4096  # eight ids/hashes plus a few init-script hashes fit many times over
MAX_INIT_SCRIPTS: Final = 64
_FIELDS: Final = (
    "app_id", "compose_hash", "instance_id", "device_id", "mr_system", "mr_aggregated",
    "os_image_hash", "key_provider_info",
)  # fmt: skip
_FIXED: Final = {"mr_system": 32, "mr_aggregated": 32}  # `[u8; 32]` in dstack's struct
_DECODER: Final = msgspec.msgpack.Decoder(list[Any])


class AppInfoDecodeError(TdxError):
    """The AppInfo extension is not dstack's encoding; the message says which part."""


def encode_app_info(info: AppInfo) -> bytes:
    """rmp_serde's encoding of dstack's `AppInfo` (v0.5.11's eight fields; main's ninth only
    when there are init-script hashes)."""
    items: list[Any] = [getattr(info, name) for name in _FIELDS]
    if info.init_script_hashes:
        items.append(list(info.init_script_hashes))
    return msgspec.msgpack.encode(items)


def decode_app_info_ext(raw: bytes) -> AppInfo:
    """The AppInfo an extension's content states (bounded; `AppInfoDecodeError` otherwise)."""
    if len(raw) > MAX_APP_INFO:
        raise AppInfoDecodeError(f"app info is {len(raw)} bytes, over {MAX_APP_INFO}")
    try:
        items = _DECODER.decode(raw)
    except msgspec.DecodeError as e:
        raise AppInfoDecodeError(f"app info is not MessagePack: {e}") from None
    if len(items) not in (len(_FIELDS), len(_FIELDS) + 1):
        raise AppInfoDecodeError(
            f"app info has {len(items)} fields, not {len(_FIELDS)} (v0.5.11) or {len(_FIELDS) + 1}"
        )
    fields: dict[str, bytes] = {}
    for name, value in zip(_FIELDS, items, strict=False):
        if not isinstance(value, bytes):
            raise AppInfoDecodeError(f"app info {name} is {type(value).__name__}, not bytes")
        want = _FIXED.get(name)
        if want is not None and len(value) != want:
            raise AppInfoDecodeError(f"app info {name} is {len(value)} bytes, not {want}")
        fields[name] = value
    scripts: tuple[bytes, ...] = ()
    if len(items) > len(_FIELDS):
        extra = items[-1]
        if not isinstance(extra, list) or len(extra) > MAX_INIT_SCRIPTS:
            raise AppInfoDecodeError(
                f"app info init_script_hashes is not a list of at most {MAX_INIT_SCRIPTS}"
            )
        if not all(isinstance(h, bytes) for h in extra):
            raise AppInfoDecodeError("app info init_script_hashes holds something not bytes")
        scripts = tuple(extra)
    return AppInfo(**fields, init_script_hashes=scripts)
