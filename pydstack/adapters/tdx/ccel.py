"""Parse the CCEL boot event log (TCG2 crypto-agile format) into dstack's `TdxEvent`s.

The firmware writes this log (ACPI table CCEL, `/sys/firmware/acpi/tables/data/CCEL` in the
guest). Layout (TCG PC Client Platform Firmware Profile):

    header: TCG_PCClientPCREvent {u32 mr, u32 type, u8 sha1[20], u32 size, SpecIdEvent}
    events: TCG_PCR_EVENT2 {u32 mr, u32 type, u32 count, {u16 alg, digest}*count,
                            u32 size, u8 data[size]}
    end:    mr index 0xFFFFFFFF (the unused tail of the table is 0xff) or end of data

Pure: bytes in, events out. Any defect is one `EventLogError` naming the offset.

    events = parse_ccel(open("/sys/firmware/acpi/tables/data/CCEL", "rb").read())
"""

from __future__ import annotations

import msgspec

from .eventlog import EventLogError, TdxEvent

TPM_ALG_SHA384 = 0x000C
_KNOWN_DIGEST_SIZES = {0x0004: 20, 0x000B: 32, 0x000C: 48, 0x000D: 64}
_SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
_END_MARKER = 0xFFFFFFFF
_MAX_DIGESTS = 8  # no platform defines more banks; bounds work on hostile input

# TDX firmware (OVMF before 2025-05) logs three RTMR0 "ACPI DATA" events that differ only
# by position; dstack names them so verifiers can refer to them.
TDX_ACPI_DATA_EVENT_TYPE = 10
TDX_ACPI_DATA_EVENT_PAYLOAD = b"ACPI DATA"
TDX_ACPI_DATA_EVENT_NAMES = ("acpi-loader", "acpi-rsdp", "acpi-tables")


class SpecIdHeader(msgspec.Struct, frozen=True):
    platform_class: int
    spec_version: tuple[int, int, int]  # major, minor, errata
    uintn_size: int
    digest_sizes: dict[int, int]  # algorithm id -> digest length
    vendor_info: bytes


class _Cursor:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or n > self.left():
            raise EventLogError(
                f"truncated CCEL: {field} needs {n} bytes at offset {self.pos}, {self.left()} left"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "little")


def _spec_id(data: bytes) -> SpecIdHeader:
    c = _Cursor(data)
    if c.take(16, "spec_id.signature") != _SPEC_ID_SIGNATURE:
        raise EventLogError("CCEL header is not a 'Spec ID Event03' (not a crypto-agile log)")
    platform_class = c.uint(4, "spec_id.platform_class")
    minor = c.uint(1, "spec_id.version_minor")
    major = c.uint(1, "spec_id.version_major")
    errata = c.uint(1, "spec_id.errata")
    uintn = c.uint(1, "spec_id.uintn_size")
    n = c.uint(4, "spec_id.number_of_algorithms")
    if n > _MAX_DIGESTS:
        raise EventLogError(f"CCEL header lists {n} digest algorithms (max {_MAX_DIGESTS})")
    sizes: dict[int, int] = {}
    for _ in range(n):
        alg = c.uint(2, "spec_id.algorithm_id")
        sizes[alg] = c.uint(2, "spec_id.digest_size")
    vendor = c.take(c.uint(1, "spec_id.vendor_info_size"), "spec_id.vendor_info")
    return SpecIdHeader(
        platform_class=platform_class,
        spec_version=(major, minor, errata),
        uintn_size=uintn,
        digest_sizes=sizes,
        vendor_info=vendor,
    )


def parse_ccel_with_header(data: bytes) -> tuple[SpecIdHeader, list[TdxEvent]]:
    """Parse a CCEL; returns its Spec ID header and the events of MR 1-4 as RTMR 0-3."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EventLogError(f"CCEL must be bytes, got {type(data).__name__}")
    c = _Cursor(bytes(data))
    c.take(4, "header.mr_index")
    c.take(4, "header.event_type")
    c.take(20, "header.digest")
    header = _spec_id(c.take(c.uint(4, "header.event_size"), "header.event"))
    events: list[TdxEvent] = []
    while c.left() >= 4:
        at = c.pos
        mr = c.uint(4, "event.mr_index")
        if mr == _END_MARKER:
            break
        event_type = c.uint(4, "event.event_type")
        count = c.uint(4, "event.digest_count")
        if count > _MAX_DIGESTS:
            raise EventLogError(f"CCEL event at offset {at}: {count} digests (max {_MAX_DIGESTS})")
        digests: dict[int, bytes] = {}
        for _ in range(count):
            alg = c.uint(2, "event.digest_algorithm")
            size = header.digest_sizes.get(alg, _KNOWN_DIGEST_SIZES.get(alg))
            if size is None:
                raise EventLogError(
                    f"CCEL event at offset {at}: digest algorithm {alg:#06x} has no known size"
                )
            digests[alg] = c.take(size, "event.digest")
        payload = c.take(c.uint(4, "event.event_size"), "event.event")
        if mr == 0:
            continue  # some firmware (GCP) logs MR 0, which is no RTMR; dstack skips it too
        digest = digests.get(TPM_ALG_SHA384)
        if digest is None:
            raise EventLogError(f"CCEL event at offset {at}: no SHA-384 digest (RTMRs need one)")
        events.append(
            TdxEvent(imr=mr - 1, event_type=event_type, digest=digest, event_payload=payload)
        )
    return header, label_acpi_data_events(events)


def parse_ccel(data: bytes) -> list[TdxEvent]:
    """Parse a CCEL into events (IMR = CCEL MR index - 1, SHA-384 digests only)."""
    return parse_ccel_with_header(data)[1]


def label_acpi_data_events(events: list[TdxEvent]) -> list[TdxEvent]:
    out: list[TdxEvent] = []
    k = 0
    for ev in events:
        if (
            ev.imr == 0
            and ev.event_type == TDX_ACPI_DATA_EVENT_TYPE
            and ev.event_payload == TDX_ACPI_DATA_EVENT_PAYLOAD
            and k < len(TDX_ACPI_DATA_EVENT_NAMES)
        ):
            ev = msgspec.structs.replace(ev, event=TDX_ACPI_DATA_EVENT_NAMES[k])
            k += 1
        out.append(ev)
    return out
