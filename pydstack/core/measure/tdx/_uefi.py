"""The UEFI variable contents OVMF measures into RTMR0, rebuilt byte for byte. Pure.

For ``EV_EFI_VARIABLE_DRIVER_CONFIG`` (Secure Boot variables) the digest covers a
``UEFI_VARIABLE_DATA`` header with no data; for ``BootOrder`` and ``Boot####`` it covers the
variable's data alone (an ``EFI_LOAD_OPTION``).
"""

from __future__ import annotations

import struct

from ._digest import guid_le, utf16le

EFI_GLOBAL_VARIABLE = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
EFI_IMAGE_SECURITY_DATABASE = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"

LOAD_OPTION_ACTIVE = 0x001
LOAD_OPTION_HIDDEN = 0x008
LOAD_OPTION_CATEGORY_APP = 0x100


def empty_variable_data(vendor_guid: str, name: str) -> bytes:
    """``UEFI_VARIABLE_DATA`` of an unset variable: GUID, name length, zero data length, name."""
    # The length is in characters: dstack-mr uses the UTF-8 length, the same for ASCII names.
    return guid_le(vendor_guid) + struct.pack("<QQ", len(name), 0) + utf16le(name)


def boot_order(entries: tuple[int, ...]) -> bytes:
    """A ``BootOrder`` value: the ``Boot####`` numbers as little-endian u16s."""
    return b"".join(e.to_bytes(2, "little") for e in entries)


def device_path_node(node_type: int, subtype: int, data: bytes = b"") -> bytes:
    return bytes([node_type, subtype]) + (4 + len(data)).to_bytes(2, "little") + data


def fv_node(fv_guid: str) -> bytes:
    """MEDIA_DEVICE_PATH / PIWG firmware volume."""
    return device_path_node(0x04, 0x07, guid_le(fv_guid))


def fv_file_node(file_guid: str) -> bytes:
    """MEDIA_DEVICE_PATH / PIWG firmware file."""
    return device_path_node(0x04, 0x06, guid_le(file_guid))


END_OF_DEVICE_PATH = device_path_node(0x7F, 0xFF)


def load_option(
    attributes: int, description: str, file_path: tuple[bytes, ...], optional_data: bytes = b""
) -> bytes:
    """An ``EFI_LOAD_OPTION`` (a ``Boot####`` value); the description gets its NUL."""
    path = b"".join(file_path)
    return (
        attributes.to_bytes(4, "little")
        + len(path).to_bytes(2, "little")
        + utf16le(description)
        + b"\0\0"
        + path
        + optional_data
    )
