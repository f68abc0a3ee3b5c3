"""dstack's `CertSigningRequestV2` (SignCert, api_version 2), SCALE encoded. Pure.

    CertSigningRequestV2 { confirm: String, pubkey: Vec<u8> (SPKI DER),
        config: CertConfigV2 { org_name: Option<String>, subject: String,
            subject_alt_names: Vec<String>, usage_server_auth: bool, usage_client_auth: bool,
            ext_quote: bool, ext_app_info: bool, not_before: Option<u64>,
            not_after: Option<u64> },
        attestation: VersionedAttestation }

The attestation is the last field, so it is handed back as raw bytes for the attestation
adapter to decode. The client signs the whole encoding with its P-256 key (ECDSA-SHA256, DER).

    csr, attestation_bytes = decode_csr(blob)
"""

from __future__ import annotations

import msgspec

CONFIRM = "please sign cert:"


class CsrError(ValueError):
    """Not a CertSigningRequestV2; the message names the field."""


class CertConfig(msgspec.Struct, frozen=True, kw_only=True):
    subject: str
    org_name: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    usage_server_auth: bool = False
    usage_client_auth: bool = False
    ext_quote: bool = False
    ext_app_info: bool = False
    not_before: int | None = None
    not_after: int | None = None


class Csr(msgspec.Struct, frozen=True):
    confirm: str
    pubkey: bytes
    config: CertConfig


def _compact(n: int) -> bytes:
    if n < 1 << 6:
        return bytes([n << 2])
    if n < 1 << 14:
        return ((n << 2) | 1).to_bytes(2, "little")
    if n < 1 << 30:
        return ((n << 2) | 2).to_bytes(4, "little")
    raw = n.to_bytes((n.bit_length() + 7) // 8, "little")
    return bytes([((len(raw) - 4) << 2) | 3]) + raw


def _bytes(b: bytes) -> bytes:
    return _compact(len(b)) + b


def _str(s: str) -> bytes:
    return _bytes(s.encode())


def _opt(v: bytes | None) -> bytes:
    return b"\x00" if v is None else b"\x01" + v


def csr_head(csr: Csr) -> list[bytes]:
    """The fields both CSR versions (V1: csr_v1, V2 here) start with, in dstack's order, up
    to the usage flags where the two part."""
    c = csr.config
    return [
        _str(csr.confirm),
        _bytes(csr.pubkey),
        _opt(None if c.org_name is None else _str(c.org_name)),
        _str(c.subject),
        _compact(len(c.subject_alt_names)),
        *(_str(n) for n in c.subject_alt_names),
    ]


def encode_csr(csr: Csr, attestation: bytes) -> bytes:
    c = csr.config
    parts = [
        *csr_head(csr),
        bytes([c.usage_server_auth, c.usage_client_auth, c.ext_quote, c.ext_app_info]),
        _opt(None if c.not_before is None else c.not_before.to_bytes(8, "little")),
        _opt(None if c.not_after is None else c.not_after.to_bytes(8, "little")),
        attestation,
    ]
    return b"".join(parts)


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise CsrError(f"csr truncated at {field} (offset {self.pos})")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def compact(self, field: str) -> int:
        b0 = self.take(1, field)[0]
        mode = b0 & 3
        if mode == 0:
            return b0 >> 2
        if mode == 1:
            return (b0 | self.take(1, field)[0] << 8) >> 2
        if mode == 2:
            return (b0 | int.from_bytes(self.take(3, field), "little") << 8) >> 2
        return int.from_bytes(self.take((b0 >> 2) + 4, field), "little")

    def bytes_(self, field: str) -> bytes:
        return self.take(self.compact(field), field)

    def str_(self, field: str) -> str:
        try:
            return self.bytes_(field).decode()
        except UnicodeDecodeError:
            raise CsrError(f"csr {field} is not UTF-8") from None

    def flag(self, field: str) -> bool:
        b = self.take(1, field)[0]
        if b > 1:
            raise CsrError(f"csr {field} is not a bool")
        return bool(b)

    def opt_u64(self, field: str) -> int | None:
        return int.from_bytes(self.take(8, field), "little") if self.flag(field) else None


def decode_csr(data: bytes) -> tuple[Csr, bytes]:
    """The CSR and the raw bytes of its attestation (the rest of `data`)."""
    r = _Reader(bytes(data))
    confirm = r.str_("confirm")
    pubkey = r.bytes_("pubkey")
    org = r.str_("config.org_name") if r.flag("config.org_name") else None
    subject = r.str_("config.subject")
    n = r.compact("config.subject_alt_names")
    if n > len(data):
        raise CsrError("csr config.subject_alt_names count is too large")
    alt = tuple(r.str_(f"config.subject_alt_names[{i}]") for i in range(n))
    flags = [r.flag(f) for f in ("usage_server_auth", "usage_client_auth", "ext_quote", "app")]
    config = CertConfig(
        subject=subject,
        org_name=org,
        subject_alt_names=alt,
        usage_server_auth=flags[0],
        usage_client_auth=flags[1],
        ext_quote=flags[2],
        ext_app_info=flags[3],
        not_before=r.opt_u64("config.not_before"),
        not_after=r.opt_u64("config.not_after"),
    )
    return Csr(confirm, pubkey, config), r.buf[r.pos :]
