"""TDX event logs the way dstack writes them: parse, serialize, replay to RTMR0-3, compare.

Everything here is pure (no I/O, no clock). An event log is a list of frozen `TdxEvent`s in
extend order; IMR index `i` is RTMR`i` (CCEL's 1-based MR index minus one, see `ccel.py`).

    events = parse_json_event_log(text)            # dstack's JSON (GetQuote.event_log)
    report = replay_and_compare(events, quote.report.rtmrs)
    if not report.ok:
        print(report.reasons)                      # names the event and RTMR that broke

dstack runtime events (IMR 3, type 0x08000001) are bound to their name and payload by the
digest rule, checked here, so a changed payload is caught even when the stated digest was
left alone. Boot-time payloads (IMR 0-2) are informational, as in dstack: their digests
cover firmware data that the log does not carry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

import msgspec

from .errors import TdxError

RTMR_COUNT = 4
RTMR_LEN = 48
DSTACK_RUNTIME_EVENT_TYPE = 0x08000001
EV_NO_ACTION = 0x00000003  # TCG: recorded in the log but never extended into a register
EVENT_LOG_V1 = 1
EVENT_LOG_V2 = 2  # dstack's canonical-JSON digest (RFC 8785) for runtime events

_ZERO_MR = bytes(RTMR_LEN)


class EventLogError(TdxError):
    """The event log is malformed; the message names the event index and field."""


class TdxEvent(msgspec.Struct, frozen=True):
    """One extend of an RTMR, as in dstack's `cc_eventlog::TdxEvent`.

    `version` only matters for runtime events (which digest rule applies); SCALE encodings
    never carry it, and JSON only when it is 2.
    """

    imr: int
    event_type: int
    digest: bytes
    event: str = ""
    event_payload: bytes = b""
    version: int = EVENT_LOG_V1

    @property
    def is_runtime(self) -> bool:
        return self.event_type == DSTACK_RUNTIME_EVENT_TYPE


class RuntimeEvent(msgspec.Struct, frozen=True):
    """A dstack runtime event (`name`, `payload`), the unit that extends RTMR3."""

    event: str
    payload: bytes
    version: int = EVENT_LOG_V1


class ReplayReport(msgspec.Struct, frozen=True):
    """Outcome of replaying a log against quoted RTMRs; `reasons` is empty when it holds."""

    replayed: tuple[bytes, bytes, bytes, bytes]
    reasons: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.reasons


def canonical_event_json_v2(name: str, payload: bytes) -> bytes:
    """RFC 8785 JSON of a v2 runtime event (keys sorted, no spaces, UTF-8 verbatim)."""
    # json.dumps escapes exactly like JCS for these three keys: short escapes for \b\f\n\r\t,
    # lowercase \u00xx for other controls, non-ASCII left as is; the integer has no exponent.
    obj = {"name": name, "payload": payload.hex(), "type": DSTACK_RUNTIME_EVENT_TYPE}
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def runtime_event_preimage(name: str, payload: bytes, version: int = EVENT_LOG_V1) -> bytes:
    """Bytes whose sha384 is the event digest: v1 `le32(type):name:payload`, v2 JCS JSON."""
    if version == EVENT_LOG_V2:
        return canonical_event_json_v2(name, payload)
    return (
        DSTACK_RUNTIME_EVENT_TYPE.to_bytes(4, "little")
        + b":"
        + name.encode("utf-8")
        + b":"
        + bytes(payload)
    )


def runtime_event_digest(name: str, payload: bytes, version: int = EVENT_LOG_V1) -> bytes:
    return hashlib.sha384(runtime_event_preimage(name, payload, version)).digest()


def runtime_tdx_event(name: str, payload: bytes, version: int = EVENT_LOG_V1) -> TdxEvent:
    """The IMR-3 log entry for a runtime event, with its digest computed."""
    return TdxEvent(
        imr=3,
        event_type=DSTACK_RUNTIME_EVENT_TYPE,
        digest=runtime_event_digest(name, payload, version),
        event=name,
        event_payload=bytes(payload),
        version=version,
    )


def extend(mr: bytes, digest: bytes) -> bytes:
    """One RTMR extend: `sha384(mr || digest)`."""
    return hashlib.sha384(mr + digest).digest()


def effective_digest(event: TdxEvent) -> bytes:
    """The digest that replay uses: runtime events with an empty digest get the computed one.

    dstack strips runtime digests from certificate-embedded logs because they follow from
    the name and payload; an explicit digest is kept as stated (and checked separately).
    """
    if event.is_runtime and not event.digest:
        return runtime_event_digest(event.event, event.event_payload, event.version)
    return event.digest


def replay_rtmrs(events: Iterable[TdxEvent]) -> tuple[bytes, bytes, bytes, bytes]:
    """Replay a log from four zero registers; raises `EventLogError` on a bad IMR or digest."""
    mrs = [_ZERO_MR] * RTMR_COUNT
    for i, ev in enumerate(events):
        if not 0 <= ev.imr < RTMR_COUNT:
            raise EventLogError(f"event {i}: imr {ev.imr} is not an RTMR index (0-3)")
        if ev.event_type == EV_NO_ACTION:
            continue
        digest = effective_digest(ev)
        if len(digest) != RTMR_LEN:
            raise EventLogError(
                f"event {i} (imr {ev.imr}): digest is {len(digest)} bytes, want {RTMR_LEN}"
            )
        mrs[ev.imr] = extend(mrs[ev.imr], digest)
    return (mrs[0], mrs[1], mrs[2], mrs[3])


def replay_runtime_events(events: Iterable[RuntimeEvent], to_event: str | None = None) -> bytes:
    """RTMR3 from runtime events only, optionally stopping after the first `to_event`.

    dstack measures the boot state as RTMR3 up to and including `boot-mr-done`.
    """
    mr = _ZERO_MR
    for ev in events:
        mr = extend(mr, runtime_event_digest(ev.event, ev.payload, ev.version))
        if to_event is not None and ev.event == to_event:
            break
    return mr


def runtime_events_of(events: Iterable[TdxEvent]) -> list[RuntimeEvent]:
    """The dstack runtime events of a log, in order (what dstack calls `runtime_events`)."""
    return [
        RuntimeEvent(event=e.event, payload=e.event_payload, version=e.version)
        for e in events
        if e.is_runtime
    ]


def runtime_digest_problems(events: Sequence[TdxEvent]) -> list[str]:
    """Reasons for every runtime event whose stated digest is not its digest rule's value."""
    out: list[str] = []
    for i, ev in enumerate(events):
        if not ev.is_runtime or not ev.digest:
            continue
        want = runtime_event_digest(ev.event, ev.event_payload, ev.version)
        if ev.digest != want:
            out.append(
                f"event {i} (imr {ev.imr}, {ev.event!r}): digest {ev.digest.hex()} is not "
                f"sha384 of its name and payload ({want.hex()})"
            )
        if ev.imr != 3:
            out.append(f"event {i} ({ev.event!r}): runtime event in imr {ev.imr}, want 3")
    return out


def replay_and_compare(events: Sequence[TdxEvent], rtmrs: Sequence[bytes]) -> ReplayReport:
    """Replay `events` and compare with a quote's RTMR0-3; every difference is a reason."""
    if len(rtmrs) != RTMR_COUNT:
        raise EventLogError(f"want {RTMR_COUNT} quoted RTMRs, got {len(rtmrs)}")
    replayed = replay_rtmrs(events)
    reasons = runtime_digest_problems(events)
    for i, (got, quoted) in enumerate(zip(replayed, rtmrs, strict=True)):
        if got != bytes(quoted):
            n = sum(1 for e in events if e.imr == i)
            reasons.append(
                f"RTMR{i} mismatch: quoted {bytes(quoted).hex()}, replayed {got.hex()} "
                f"from {n} events"
            )
    return ReplayReport(replayed=replayed, reasons=tuple(reasons))


# --- dstack's JSON form: hex for bytes, `version`/`preimage` only for v2 runtime events ---


class _JsonEvent(msgspec.Struct, frozen=True):
    imr: int
    event_type: int
    digest: str = ""
    event: str = ""
    event_payload: str = ""
    version: int = EVENT_LOG_V1
    preimage: str | None = None


_json_decoder = msgspec.json.Decoder(list[_JsonEvent])
_json_encoder = msgspec.json.Encoder()


def _unhex(text: str, i: int, field: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise EventLogError(f"event {i}: {field} is not hex") from None


def _check_u32(value: int, i: int, field: str) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise EventLogError(f"event {i}: {field} {value} does not fit in u32")


def parse_json_event_log(data: str | bytes) -> list[TdxEvent]:
    """Parse dstack's JSON event log (a list of objects with hex `digest`/`event_payload`)."""
    try:
        raw = _json_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise EventLogError(f"event log is not dstack's JSON event list: {e}") from None
    out: list[TdxEvent] = []
    for i, r in enumerate(raw):
        _check_u32(r.imr, i, "imr")
        _check_u32(r.event_type, i, "event_type")
        if r.version not in (EVENT_LOG_V1, EVENT_LOG_V2):
            raise EventLogError(f"event {i}: unknown event log version {r.version}")
        ev = TdxEvent(
            imr=r.imr,
            event_type=r.event_type,
            digest=_unhex(r.digest, i, "digest"),
            event=r.event,
            event_payload=_unhex(r.event_payload, i, "event_payload"),
            version=r.version,
        )
        if r.preimage is not None:
            # A v2 preimage is a claim about the digest input: it must be the canonical one.
            pre = _unhex(r.preimage, i, "preimage")
            if ev.is_runtime and pre != runtime_event_preimage(ev.event, ev.event_payload, 2):
                raise EventLogError(f"event {i}: preimage is not the canonical event JSON")
        out.append(ev)
    return out


def event_to_json_obj(ev: TdxEvent) -> dict[str, object]:
    obj: dict[str, object] = {
        "imr": ev.imr,
        "event_type": ev.event_type,
        "digest": ev.digest.hex(),
        "event": ev.event,
        "event_payload": ev.event_payload.hex(),
    }
    if ev.version != EVENT_LOG_V1:
        obj["version"] = ev.version
        if ev.is_runtime:
            obj["preimage"] = runtime_event_preimage(ev.event, ev.event_payload, ev.version).hex()
    return obj


def dump_json_event_log(events: Iterable[TdxEvent]) -> str:
    """dstack's JSON text for a log: full digests and payloads, so any client can replay."""
    return _json_encoder.encode([event_to_json_obj(e) for e in events]).decode()
