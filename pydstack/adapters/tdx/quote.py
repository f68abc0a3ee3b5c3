"""Parse Intel TDX quotes (v4, and v5 with TD 1.0 / TD 1.5 bodies) into frozen structs.

Parsing is pure and never trusts the input: every read is bounds-checked and any defect
becomes one `QuoteParseError` naming the field and its offset. Parsing proves nothing
about authenticity; `verify.verify_quote` does that through dcap-qvl.

    q = parse_quote(raw)
    q.report.mr_td, q.report.rtmrs, q.report.report_data, q.debug, q.pck_chain_pem
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from .errors import QuoteParseError

HEADER_LEN = 48
TD10_LEN = 584
TD15_LEN = 648  # TD 1.0 body + tee_tcb_svn2[16] + mr_servicetd[48]
QE_REPORT_LEN = 384
V5_BODY_DESCRIPTOR_LEN = 6  # u16 body_type + u32 body_size, part of the signed region

TEE_TYPE_TDX = 0x81
ATT_KEY_ECDSA_P256 = 2
BODY_TD10 = 2
BODY_TD15 = 3
CERT_QE_REPORT = 6  # certification data carrying the QE report (+ inner PCK chain)
CERT_PCK_CHAIN = 5  # PEM chain PCK leaf -> platform/processor CA (-> root)

_PEM_END = b"-----END CERTIFICATE-----"


class QuoteHeader(msgspec.Struct, frozen=True):
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


class TdReport(msgspec.Struct, frozen=True):
    """TD report body. TD 1.5 fields are None for a TD 1.0 body."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_service_td: bytes | None = None

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    @property
    def debug(self) -> bool:
        # TDX module spec: TD_ATTRIBUTES bit 0 (TUD.DEBUG) makes the TD's state host-readable.
        return bool(self.td_attributes[0] & 1)


class EnclaveReport(msgspec.Struct, frozen=True):
    """SGX report body; in a TDX quote this is the Quoting Enclave's report."""

    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes


class QeCertification(msgspec.Struct, frozen=True):
    """Certification data type 6: QE report, its PCK signature, QE auth data, inner cert data."""

    qe_report: EnclaveReport
    qe_report_raw: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_type: int
    cert_data: bytes


class QuoteSignature(msgspec.Struct, frozen=True):
    ecdsa_signature: bytes  # raw r||s by the attestation key over the signed region
    attestation_key: bytes  # raw P-256 x||y
    qe: QeCertification


class Quote(msgspec.Struct, frozen=True):
    header: QuoteHeader
    body_type: int  # BODY_TD10 or BODY_TD15 (v4 quotes are always BODY_TD10)
    report: TdReport
    signature: QuoteSignature
    signed_len: int  # quote[:signed_len] is what the attestation key signed

    @property
    def debug(self) -> bool:
        return self.report.debug

    @property
    def pck_chain_pem(self) -> list[str]:
        """PEM certificates of the inner type-5 data, leaf first; empty for other types."""
        if self.signature.qe.cert_type != CERT_PCK_CHAIN:
            return []
        data = self.signature.qe.cert_data.rstrip(b"\x00")
        out: list[str] = []
        for part in data.split(_PEM_END):
            start = part.find(b"-----BEGIN CERTIFICATE-----")
            if start >= 0:
                out.append((part[start:] + _PEM_END).decode("ascii", "replace") + "\n")
        return out


class _Reader:
    """Bounds-checked little-endian cursor; `base` maps sub-buffers to quote offsets."""

    __slots__ = ("base", "buf", "pos")

    def __init__(self, buf: bytes, base: int = 0) -> None:
        self.buf = buf
        self.pos = 0
        self.base = base

    def take(self, n: int, field: str) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            left = len(self.buf) - self.pos
            raise QuoteParseError(
                f"truncated quote: {field} needs {n} bytes at offset {self.base + self.pos}, "
                f"{left} left"
            )
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "little")

    def offset(self) -> int:
        return self.base + self.pos


_TD10_FIELDS = tuple(
    (f"td_report.{name}", n)
    for name, n in (
        ("tee_tcb_svn", 16),
        ("mr_seam", 48),
        ("mr_signer_seam", 48),
        ("seam_attributes", 8),
        ("td_attributes", 8),
        ("xfam", 8),
        ("mr_td", 48),
        ("mr_config_id", 48),
        ("mr_owner", 48),
        ("mr_owner_config", 48),
        ("rtmr0", 48),
        ("rtmr1", 48),
        ("rtmr2", 48),
        ("rtmr3", 48),
        ("report_data", 64),
    )
)
_TD15_FIELDS = (*_TD10_FIELDS, ("td_report.tee_tcb_svn2", 16), ("td_report.mr_service_td", 48))
_HEADER_FIELDS = (
    ("header.version", 2),
    ("header.att_key_type", 2),
    ("header.tee_type", 4),
    ("header.qe_svn", 2),
    ("header.pce_svn", 2),
    ("header.qe_vendor_id", 16),
    ("header.user_data", 20),
)
_ENCLAVE_FIELDS = tuple(
    (f"qe_report.{name}", n)
    for name, n in (
        ("cpu_svn", 16),
        ("misc_select", 4),
        ("reserved1", 28),
        ("attributes", 16),
        ("mr_enclave", 32),
        ("reserved2", 32),
        ("mr_signer", 32),
        ("reserved3", 96),
        ("isv_prod_id", 2),
        ("isv_svn", 2),
        ("reserved4", 60),
        ("report_data", 64),
    )
)


# Fixed layouts are unpacked by one precompiled struct after one bounds check: parsing runs
# on every verification, and per-field reads cost more than dcap-qvl's budget allows.
_TD10 = struct.Struct("<" + "".join(f"{n}s" for _, n in _TD10_FIELDS))
_TD15 = struct.Struct("<" + "".join(f"{n}s" for _, n in _TD15_FIELDS))
_HEADER = struct.Struct("<HHIHH16s20s")
_ENCLAVE = struct.Struct("<16sI28x16s32s32x32s96xHH60x64s")


def _fixed(
    r: _Reader, layout: struct.Struct, fields: tuple[tuple[str, int], ...]
) -> tuple[Any, ...]:
    if r.pos + layout.size > len(r.buf):
        for name, n in fields:  # slow path, only to name the field that does not fit
            r.take(n, name)
    out = layout.unpack_from(r.buf, r.pos)
    r.pos += layout.size
    return out


def _header(r: _Reader) -> QuoteHeader:
    # Check the discriminating fields first so junk gets the most useful message.
    version = r.u16("header.version")
    if version not in (4, 5):
        raise QuoteParseError(f"unsupported quote version {version} at offset 0 (want 4 or 5)")
    att_key_type = r.u16("header.att_key_type")
    if att_key_type != ATT_KEY_ECDSA_P256:
        raise QuoteParseError(
            f"unsupported attestation key type {att_key_type} at offset 2 (want 2, ECDSA-P256)"
        )
    tee_type = r.u32("header.tee_type")
    if tee_type != TEE_TYPE_TDX:
        raise QuoteParseError(f"not a TDX quote: tee_type {tee_type:#x} at offset 4 (want 0x81)")
    r.pos = 0
    return QuoteHeader(*_fixed(r, _HEADER, _HEADER_FIELDS))


def _td_report(r: _Reader, td15: bool) -> TdReport:
    if td15:
        return TdReport(*_fixed(r, _TD15, _TD15_FIELDS))
    return TdReport(*_fixed(r, _TD10, _TD10_FIELDS))


def parse_enclave_report(raw: bytes, base: int = 0) -> EnclaveReport:
    """Parse a 384-byte SGX report body (the QE report); `base` is its quote offset."""
    return EnclaveReport(*_fixed(_Reader(raw, base), _ENCLAVE, _ENCLAVE_FIELDS))


def _signature(r: _Reader) -> QuoteSignature:
    ecdsa_signature = r.take(64, "signature.ecdsa_signature")
    attestation_key = r.take(64, "signature.attestation_key")
    at = r.offset()
    cert_type = r.u16("signature.cert_type")
    if cert_type != CERT_QE_REPORT:
        raise QuoteParseError(
            f"unsupported certification data type {cert_type} at offset {at} (want 6, QE report)"
        )
    size = r.u32("signature.cert_size")
    c = _Reader(r.take(size, "signature.cert_data"), r.offset() - size)
    qe_at = c.offset()
    qe_raw = c.take(QE_REPORT_LEN, "qe_cert.qe_report")
    qe_sig = c.take(64, "qe_cert.qe_report_signature")
    auth_len = c.u16("qe_cert.qe_auth_data_size")
    qe_auth = c.take(auth_len, "qe_cert.qe_auth_data")
    inner_type = c.u16("qe_cert.cert_type")
    inner_len = c.u32("qe_cert.cert_size")
    inner = c.take(inner_len, "qe_cert.cert_data")
    return QuoteSignature(
        ecdsa_signature=ecdsa_signature,
        attestation_key=attestation_key,
        qe=QeCertification(
            qe_report=parse_enclave_report(qe_raw, qe_at),
            qe_report_raw=qe_raw,
            qe_report_signature=qe_sig,
            qe_auth_data=qe_auth,
            cert_type=inner_type,
            cert_data=inner,
        ),
    )


def parse_quote(raw: bytes) -> Quote:
    """Parse a TDX v4/v5 quote. Raises `QuoteParseError` on any defect, nothing else."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise QuoteParseError(f"quote must be bytes, got {type(raw).__name__}")
    r = _Reader(bytes(raw))
    header = _header(r)
    body_type = BODY_TD10
    if header.version == 5:
        body_type = r.u16("body.type")
        body_size = r.u32("body.size")
        want = {BODY_TD10: TD10_LEN, BODY_TD15: TD15_LEN}.get(body_type)
        if want is None:
            raise QuoteParseError(
                f"unsupported v5 body type {body_type} at offset {HEADER_LEN} (want 2 or 3)"
            )
        if body_size != want:
            raise QuoteParseError(
                f"v5 body size {body_size} at offset {HEADER_LEN + 2} does not match "
                f"body type {body_type} (want {want})"
            )
    report = _td_report(r, body_type == BODY_TD15)
    signed_len = r.offset()
    auth_size = r.u32("signature.size")
    sig_reader = _Reader(r.take(auth_size, "signature.data"), signed_len + 4)
    signature = _signature(sig_reader)
    return Quote(
        header=header,
        body_type=body_type,
        report=report,
        signature=signature,
        signed_len=signed_len,
    )
