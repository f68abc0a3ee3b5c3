"""The TDX port: get a quote, extend an RTMR, read RTMRs, and keep the log that replays.

Two backends satisfy `TdxBackend`: `ConfigfsBackend` (configfs.py) on a real TDX guest and
`SimulatorBackend` here, which signs quotes with a dev PKI. Both record every extend they make
as a `TdxEvent` after the boot events they were given, and serialize extend and quote under one
lock: `attest()` returns a quote together with exactly the log that replays to its RTMRs,
however many threads extend concurrently.

    backend = SimulatorBackend(QuoteSimulator(DevPki.generate()))
    backend.emit_event("app-id", app_id)            # RTMR3, dstack's digest rule
    quote, log = backend.attest(report_data)        # replay_rtmrs(log) == quote's RTMRs
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Protocol

import msgspec

from pydstack.core.measure import ImageParts, VmShape, simulated_boot_log
from pydstack.core.measure.simulated import simulated_mr_td

from .errors import BackendError
from .eventlog import EventLogError, TdxEvent, extend, replay_rtmrs, runtime_tdx_event
from .simulator import QuoteSimulator, TdMeasurements

Rtmrs = tuple[bytes, bytes, bytes, bytes]

# TCG event types used by the simulated boot log (values from the TCG PC Client spec).
EV_SEPARATOR = 0x00000004
EV_IPL = 0x0000000D
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A


class TdxBackend(Protocol):
    """What the guest agent needs from TDX. Methods are thread-safe and blocking."""

    def get_quote(self, report_data: bytes) -> bytes: ...

    def extend_rtmr(self, index: int, digest: bytes) -> None: ...

    def read_rtmrs(self) -> Rtmrs: ...

    def record(self, event: TdxEvent) -> None: ...

    def emit_event(self, name: str, payload: bytes) -> TdxEvent: ...

    def event_log(self) -> list[TdxEvent]: ...

    def attest(self, report_data: bytes) -> tuple[bytes, list[TdxEvent]]: ...


def check_report_data(report_data: bytes) -> bytes:
    """dstack pads report_data up to 64 bytes with zeros and refuses longer input."""
    if len(report_data) > 64:
        raise BackendError(f"report_data is at most 64 bytes, got {len(report_data)}")
    return bytes(report_data).ljust(64, b"\x00")


def check_extend(index: int, digest: bytes) -> None:
    if not 0 <= index <= 3:
        raise BackendError(f"RTMR index must be 0-3, got {index}")
    if len(digest) != 48:
        raise BackendError(f"RTMR extend digest must be 48 bytes (sha384), got {len(digest)}")


class RecordingBackend:
    """Lock, event bookkeeping and `attest`; subclasses provide the three raw operations."""

    def __init__(self, boot_events: Sequence[TdxEvent] = ()) -> None:
        # One lock for extend and quote: a quote never sees half of a recorded extend.
        self._lock = threading.RLock()
        self._events: list[TdxEvent] = list(boot_events)

    def _raw_quote(self, report_data: bytes) -> bytes:
        raise NotImplementedError

    def _raw_extend(self, index: int, digest: bytes) -> None:
        raise NotImplementedError

    def read_rtmrs(self) -> Rtmrs:
        raise NotImplementedError

    def get_quote(self, report_data: bytes) -> bytes:
        data = check_report_data(report_data)
        with self._lock:
            return self._raw_quote(data)

    def record(self, event: TdxEvent) -> None:
        """Extend RTMR[event.imr] by event.digest and append the event to the log."""
        check_extend(event.imr, event.digest)
        with self._lock:
            self._raw_extend(event.imr, event.digest)
            self._events.append(event)

    def extend_rtmr(self, index: int, digest: bytes) -> None:
        """A bare extend; logged as an unnamed event so the log still replays."""
        self.record(TdxEvent(imr=index, event_type=0, digest=bytes(digest)))

    def emit_event(self, name: str, payload: bytes) -> TdxEvent:
        """A dstack runtime event: RTMR3 += sha384(le32(0x08000001):name:payload)."""
        event = runtime_tdx_event(name, payload)
        self.record(event)
        return event

    def event_log(self) -> list[TdxEvent]:
        with self._lock:
            return list(self._events)

    def attest(self, report_data: bytes) -> tuple[bytes, list[TdxEvent]]:
        """A quote and the event log that replays to its RTMRs, taken atomically."""
        data = check_report_data(report_data)
        with self._lock:
            return self._raw_quote(data), list(self._events)


def simulated_boot_events(
    *,
    firmware: bytes = b"pydstack simulated TDVF",
    kernel: bytes = b"pydstack simulated kernel",
    cmdline: bytes = b"console=ttyS0 root=/dev/vda1",
    initrd: bytes = b"pydstack simulated initrd",
) -> list[TdxEvent]:
    """A small boot log shaped like TDVF's: firmware config in RTMR0, kernel in RTMR1,
    command line and initrd in RTMR2, each register closed by a separator."""
    separator = hashlib.sha384(bytes(4)).digest()

    def ev(imr: int, etype: int, name: str, data: bytes) -> TdxEvent:
        return TdxEvent(imr, etype, hashlib.sha384(data).digest(), name, data[:64])

    return [
        ev(0, EV_EFI_PLATFORM_FIRMWARE_BLOB2, "TdHob", firmware + b"/hob"),
        ev(0, EV_EFI_PLATFORM_FIRMWARE_BLOB2, "CFV", firmware + b"/cfv"),
        ev(0, EV_EFI_VARIABLE_DRIVER_CONFIG, "SecureBoot", b"\x00"),
        TdxEvent(0, EV_SEPARATOR, separator, "separator", bytes(4)),
        ev(1, EV_EFI_BOOT_SERVICES_APPLICATION, "kernel", kernel),
        TdxEvent(1, EV_SEPARATOR, separator, "separator", bytes(4)),
        ev(2, EV_IPL, "cmdline", cmdline),
        ev(2, EV_IPL, "initrd", initrd),
    ]


class SimulatorBackend(RecordingBackend):
    """TDX in memory: RTMRs start at zero, replay the boot log, and quotes come from a
    `QuoteSimulator`, so every quote verifies (dev root) and replays to its log."""

    def __init__(
        self,
        simulator: QuoteSimulator,
        measurements: TdMeasurements | None = None,
        boot_events: Sequence[TdxEvent] | None = None,
    ) -> None:
        events = simulated_boot_events() if boot_events is None else list(boot_events)
        super().__init__(events)
        self.simulator = simulator
        self._base = measurements or TdMeasurements(
            mr_td=hashlib.sha384(b"pydstack simulated TD image").digest()
        )
        try:
            self._rtmrs = list(replay_rtmrs(events))
        except EventLogError as e:
            raise BackendError(f"simulated boot log does not replay: {e}") from e

    def _raw_quote(self, report_data: bytes) -> bytes:
        r = self._rtmrs
        m = msgspec.structs.replace(self._base, rtmrs=(r[0], r[1], r[2], r[3]))
        return self.simulator.quote(report_data, m)

    def _raw_extend(self, index: int, digest: bytes) -> None:
        self._rtmrs[index] = extend(self._rtmrs[index], digest)

    def read_rtmrs(self) -> Rtmrs:
        with self._lock:
            r = self._rtmrs
            return (r[0], r[1], r[2], r[3])


def measured_simulator(
    simulator: QuoteSimulator, parts: ImageParts, shape: VmShape, *,
    mr_config_id: bytes = bytes(48), td: TdMeasurements | None = None,
) -> SimulatorBackend:  # fmt: skip
    """A simulated TD booted from an image's `parts` in a VM of `shape`: MRTD and the boot
    log (RTMR0-2) by the simulator's measurement rule (`core.measure.simulated`), which the
    KMS recomputes from the image registered on the log."""
    entries = simulated_boot_log(parts, shape)
    events = [TdxEvent(e.imr, e.event_type, e.digest, e.name, e.payload) for e in entries]
    base = msgspec.structs.replace(
        td or TdMeasurements(), mr_td=simulated_mr_td(parts), mr_config_id=mr_config_id
    )  # `td`: the other report fields (attributes, owner...)
    return SimulatorBackend(simulator, base, boot_events=events)
