"""dstack's legacy SCALE-encoded `VersionedAttestation` (V0), decoded and encoded. Pure.

Wire form (parity-scale-codec; u32 little endian, Vec/String = compact length + items):

    0x00                                   VersionedAttestation::V0
    Attestation {
      quote: 0x00 DstackTdx(TdxQuote { quote: Vec<u8>, event_log: Vec<TdxEvent> }),
      runtime_events: Vec<RuntimeEvent { event: String, payload: Vec<u8> }>,
      report_data: [u8; 64],
      config: String,                      # sys-config JSON (holds vm_config)
      report: (),                          # nothing on the wire
    }
    TdxEvent { imr: u32, event_type: u32, digest: Vec<u8>, event: String, event_payload: Vec<u8> }

This is what dstack's `/Attest` returns and what its RA-TLS certificates carry under OID
1.3.6.1.4.1.62397.1.8. Other platforms' variants (SEV-SNP, Nitro, msgpack V1) are refused
with a typed error naming the tag.

    att = decode_attestation(blob)
    att.quote, att.event_log, att.runtime_events, att.report_data, att.config
"""

from __future__ import annotations

import msgspec

from .eventlog import EVENT_LOG_V1, EventLogError, RuntimeEvent, TdxEvent

_MAX_LEN = 16 * 1024 * 1024  # dstack caps attestations at 10 MiB; no vector comes close


class AttestationDecodeError(EventLogError):
    """The bytes are not a SCALE V0 TDX attestation; the message names field and offset."""


class Attestation(msgspec.Struct, frozen=True):
    quote: bytes
    event_log: tuple[TdxEvent, ...]
    runtime_events: tuple[RuntimeEvent, ...]
    report_data: bytes
    config: str = ""


class _Scale:
    # Field names are templates ("event_log[{}].imr") formatted only when an error is raised:
    # a key request decodes ~150 fields, and building each name up front was ~40% of the cost.
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int, field: str, i: int = -1) -> bytes:
        pos = self.pos
        end = pos + n
        if n < 0 or end > len(self.buf):
            raise AttestationDecodeError(
                f"truncated attestation: {_name(field, i)} needs {n} bytes at offset {pos}, "
                f"{len(self.buf) - pos} left"
            )
        self.pos = end
        return self.buf[pos:end]

    def u8(self, field: str, i: int = -1) -> int:
        return self.take(1, field, i)[0]

    def u32(self, field: str, i: int = -1) -> int:
        return int.from_bytes(self.take(4, field, i), "little")

    def compact(self, field: str, i: int = -1) -> int:
        at = self.pos
        b0 = self.u8(field, i)
        mode = b0 & 3
        if mode == 0:
            return b0 >> 2
        if mode == 1:
            return (b0 | self.u8(field, i) << 8) >> 2
        if mode == 2:
            return (b0 | int.from_bytes(self.take(3, field, i), "little") << 8) >> 2
        n = (b0 >> 2) + 4
        value = int.from_bytes(self.take(n, field, i), "little")
        if value > _MAX_LEN:
            raise AttestationDecodeError(
                f"{_name(field, i)} at offset {at}: length {value} is too large"
            )
        return value

    def vec_u8(self, field: str, i: int = -1) -> bytes:
        return self.take(self.compact(field, i), field, i)

    def string(self, field: str, i: int = -1) -> str:
        at = self.pos
        raw = self.vec_u8(field, i)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise AttestationDecodeError(f"{_name(field, i)} at offset {at} is not UTF-8") from None

    def count(self, field: str, min_item: int) -> int:
        # Each item needs at least `min_item` bytes: a huge count on short input is refused
        # before looping, so hostile input costs O(len) work.
        at = self.pos
        n = self.compact(field)
        if n * min_item > len(self.buf) - self.pos:
            raise AttestationDecodeError(f"{field} at offset {at}: {n} items cannot fit")
        return n


def _name(field: str, i: int) -> str:
    return field.format(i) if i >= 0 else field


def decode_attestation(data: bytes) -> Attestation:
    """Decode a SCALE V0 `VersionedAttestation` carrying a TDX quote; all input is consumed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise AttestationDecodeError(f"attestation must be bytes, got {type(data).__name__}")
    s = _Scale(bytes(data))
    version = s.u8("version")
    if version != 0:
        raise AttestationDecodeError(
            f"attestation version byte {version:#04x} is not V0 SCALE (msgpack V1 unsupported)"
        )
    variant = s.u8("quote.variant")
    if variant != 0:
        raise AttestationDecodeError(f"attestation quote variant {variant} is not DstackTdx (0)")
    quote = s.vec_u8("quote.quote")
    events: list[TdxEvent] = []
    for i in range(s.count("quote.event_log", 11)):
        events.append(
            TdxEvent(
                imr=s.u32("event_log[{}].imr", i),
                event_type=s.u32("event_log[{}].event_type", i),
                digest=s.vec_u8("event_log[{}].digest", i),
                event=s.string("event_log[{}].event", i),
                event_payload=s.vec_u8("event_log[{}].event_payload", i),
            )
        )
    runtime: list[RuntimeEvent] = []
    for i in range(s.count("runtime_events", 2)):
        runtime.append(
            RuntimeEvent(
                event=s.string("runtime_events[{}].event", i),
                payload=s.vec_u8("runtime_events[{}].payload", i),
            )
        )
    report_data = s.take(64, "report_data")
    config = s.string("config")
    if s.pos != len(s.buf):
        raise AttestationDecodeError(f"{len(s.buf) - s.pos} trailing bytes after the attestation")
    return Attestation(
        quote=quote,
        event_log=tuple(events),
        runtime_events=tuple(runtime),
        report_data=report_data,
        config=config,
    )


def _compact(n: int) -> bytes:
    if n < 1 << 6:
        return bytes([n << 2])
    if n < 1 << 14:
        return ((n << 2) | 1).to_bytes(2, "little")
    if n < 1 << 30:
        return ((n << 2) | 2).to_bytes(4, "little")
    raw = n.to_bytes((n.bit_length() + 7) // 8, "little")
    return bytes([((len(raw) - 4) << 2) | 3]) + raw


def _vec(b: bytes) -> bytes:
    return _compact(len(b)) + b


def encode_attestation(att: Attestation) -> bytes:
    """SCALE V0 bytes of `att`; `decode_attestation(encode_attestation(a)) == a` for v1 logs."""
    if len(att.report_data) != 64:
        raise AttestationDecodeError(f"report_data is {len(att.report_data)} bytes, want 64")
    parts = [b"\x00\x00", _vec(att.quote), _compact(len(att.event_log))]
    for ev in att.event_log:
        if ev.version != EVENT_LOG_V1:
            # SCALE V0 has no version field: a v2 event would decode with the wrong rule.
            raise AttestationDecodeError(f"event {ev.event!r} is v{ev.version}; V0 carries v1")
        parts += [
            ev.imr.to_bytes(4, "little"),
            ev.event_type.to_bytes(4, "little"),
            _vec(ev.digest),
            _vec(ev.event.encode("utf-8")),
            _vec(ev.event_payload),
        ]
    parts.append(_compact(len(att.runtime_events)))
    for rt in att.runtime_events:
        parts += [_vec(rt.event.encode("utf-8")), _vec(rt.payload)]
    parts += [att.report_data, _vec(att.config.encode("utf-8"))]
    return b"".join(parts)
