"""Small byte helpers shared by the TDX measurement modules. Pure."""

from __future__ import annotations

import hashlib
import re
import struct
import uuid
from collections.abc import Iterable

DIGEST_SIZE = 48  # SHA-384: MRTD and every RTMR
_U32 = re.compile(r"\+?[0-9]+")


class MeasureError(ValueError):
    """An input (firmware, kernel, tables, version) that cannot be measured as dstack does."""


def sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def replay(log: Iterable[bytes]) -> bytes:
    """The RTMR after extending each digest of ``log`` in order, from 48 zero bytes."""
    mr = bytes(DIGEST_SIZE)
    for digest in log:
        mr = hashlib.sha384(mr + digest).digest()
    return mr


def utf16le(text: str) -> bytes:
    # Surrogate pairs for non-BMP characters, as Rust's encode_utf16 gives.
    return text.encode("utf-16-le")


def guid_le(text: str) -> bytes:
    """A GUID's on-disk form: the first three fields little-endian (EFI_GUID)."""
    return uuid.UUID(text).bytes_le


def u16_at(data: bytes, offset: int, what: str) -> int:
    return _unpack("<H", data, offset, what)


def u32_at(data: bytes, offset: int, what: str) -> int:
    return _unpack("<I", data, offset, what)


def u64_at(data: bytes, offset: int, what: str) -> int:
    return _unpack("<Q", data, offset, what)


def _unpack(fmt: str, data: bytes, offset: int, what: str) -> int:
    size = struct.calcsize(fmt)
    if offset < 0 or offset + size > len(data):
        raise MeasureError(f"{what}: offset {offset:#x} is past the end ({len(data):#x} bytes)")
    value: int = struct.unpack_from(fmt, data, offset)[0]
    return value


def parse_u32(text: str) -> int | None:
    """A decimal u32 as Rust's ``str::parse::<u32>`` reads it (an optional ``+``), else None."""
    if not _U32.fullmatch(text):
        return None
    value = int(text)
    return value if value < 1 << 32 else None
