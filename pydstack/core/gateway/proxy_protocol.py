"""PROXY protocol v1 and v2 headers (HAProxy spec) that the proxy sends to a backend (pure).

Usage::

    header = encode_proxy_header(2, ("203.0.113.7", 51234), ("10.4.0.1", 443))
"""

from __future__ import annotations

import ipaddress

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

Address = tuple[str, int]


def encode_v1(source: Address | None, destination: Address | None) -> bytes:
    """``PROXY TCP4 src dst sport dport\\r\\n`` (``PROXY UNKNOWN`` when not IP or mixed)."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def encode_v2(source: Address | None, destination: Address | None) -> bytes:
    """The binary v2 header: PROXY command over TCP, or LOCAL/UNSPEC when unknown."""
    if source is not None and destination is not None:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        if src.version == dst.version:
            fam = 0x11 if src.version == 4 else 0x21  # TCP over IPv4 / IPv6
            body = (
                src.packed
                + dst.packed
                + source[1].to_bytes(2, "big")
                + destination[1].to_bytes(2, "big")
            )
            return V2_SIGNATURE + bytes([0x21, fam]) + len(body).to_bytes(2, "big") + body
    return V2_SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00])


def encode_proxy_header(version: int, source: Address | None, destination: Address | None) -> bytes:
    """Header for ``version`` 1 or 2; empty for 0 (no PROXY protocol)."""
    if version == 0:
        return b""
    if version == 1:
        return encode_v1(source, destination)
    if version == 2:
        return encode_v2(source, destination)
    raise ValueError(f"PROXY protocol version {version}: use 0, 1 or 2")
