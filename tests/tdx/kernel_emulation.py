"""The kernel side of configfs-tsm and the TSM measurements sysfs, emulated in a temp dir.

A thread plays the TDX guest driver: it fills a new report entry (provider, generation,
inblob, outblob) after mkdir, turns a 48-byte write to `rtmrN:sha384` into an extend, and
answers each inblob write with a simulator quote over its current RTMRs, then bumps
`generation`. Unlike the real driver it is asynchronous, so tests call `settle()` before
reading back. `mode` injects the races the backend must detect. With `td` the TD is measured
as given (MRTD, MRCONFIGID... and RTMR0-2 as its firmware left them), and `encode_ccel` lays
out the boot log that firmware would leave in the CCEL table, so a guest booting on this
kernel reads the same files a TDX guest does.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from pydstack.adapters.tdx.eventlog import TdxEvent
from pydstack.adapters.tdx.simulator import QuoteSimulator, TdMeasurements

_SHA384 = 0x000C


def encode_ccel(events: Sequence[TdxEvent]) -> bytes:
    """A CCEL (TCG2 crypto-agile log, SHA-384 only) holding `events` (RTMR n = CCEL MR n+1)."""
    spec = (b"Spec ID Event03\x00" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 1)
            + struct.pack("<HH", _SHA384, 48) + b"\x00")  # fmt: skip
    out = struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(spec)) + spec
    for e in events:
        out += struct.pack("<IIIH", e.imr + 1, e.event_type, 1, _SHA384) + e.digest
        out += struct.pack("<I", len(e.event_payload)) + e.event_payload
    return out + b"\xff" * 16  # the table's unused tail


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


class EmulatedTdxKernel:
    def __init__(
        self,
        root: Path,
        simulator: QuoteSimulator,
        *,
        provider: str = "tdx_guest\n",
        mode: str = "normal",  # "normal" | "double_bump" | "bump_during_read" | "silent"
        outblob: bytes | None = None,
        td: TdMeasurements | None = None,
        rtmr_sysfs: bool = True,  # False: a kernel before 6.16, no measurements files
    ) -> None:
        self.report_root = root / "tsm" / "report"
        self.measurements = root / "measurements"
        self.report_root.mkdir(parents=True)
        self.measurements.mkdir(parents=True)
        self.sim = simulator
        self.provider = provider
        self.mode = mode
        self.fixed_outblob = outblob
        self.td = td or TdMeasurements(mr_td=hashlib.sha384(b"emulated TD").digest())
        self.rtmrs = list(self.td.rtmrs)
        self.mr_td = self.td.mr_td
        self.served: list[bytes] = []  # every outblob it produced, in order
        self.rtmr_sysfs = rtmr_sysfs
        for i in range(4 if rtmr_sysfs else 0):
            (self.measurements / f"rtmr{i}:sha384").write_bytes(self.rtmrs[i])
        self.generations: dict[Path, int] = {}
        self.quotes_served = 0
        self.iterations = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EmulatedTdxKernel:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def settle(self) -> None:
        """Wait until the emulator has looked at everything written before this call."""
        start = self.iterations
        deadline = time.monotonic() + 5
        while self.iterations < start + 2 and time.monotonic() < deadline:
            time.sleep(0.001)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._scan_rtmrs()
            for entry in list(self.report_root.iterdir()):
                if entry.is_dir():
                    self._serve(entry)
            self.iterations += 1
            time.sleep(0.0005)

    def _scan_rtmrs(self) -> None:
        for i in range(4 if self.rtmr_sysfs else 0):
            path = self.measurements / f"rtmr{i}:sha384"
            data = path.read_bytes()
            if data != self.rtmrs[i] and len(data) == 48:  # a write: extend by it
                self.rtmrs[i] = hashlib.sha384(self.rtmrs[i] + data).digest()
                _atomic_write(path, self.rtmrs[i])

    def _serve(self, entry: Path) -> None:
        if entry not in self.generations:  # mkdir just happened: populate like configfs
            (entry / "inblob").write_bytes(b"")
            (entry / "outblob").write_bytes(b"")
            (entry / "generation").write_text("0\n")
            self.generations[entry] = 0
            _atomic_write(entry / "provider", self.provider.encode())  # last: entry complete
            return
        inblob = entry / "inblob"
        data = inblob.read_bytes()
        if not data or self.mode == "silent":
            return
        inblob.write_bytes(b"")  # consumed; the next write is visible even if identical
        self._scan_rtmrs()  # an extend written before this inblob must be in the quote
        r = self.rtmrs
        quote = self.fixed_outblob or self.sim.quote(
            data[:64], msgspec.structs.replace(self.td, rtmrs=(r[0], r[1], r[2], r[3]))
        )
        self.served.append(quote)
        gen = self.generations[entry] + 1
        if self.mode == "bump_during_read":
            # outblob becomes a FIFO: the reader blocks until we bump generation again and
            # only then receive the data, so the race is deterministic.
            out = entry / "outblob"
            out.unlink()
            os.mkfifo(out)
            self._set_gen(entry, gen)
            with open(out, "wb") as f:
                self._set_gen(entry, gen + 1)
                f.write(quote)
            out.unlink()
            out.write_bytes(b"")
            self.quotes_served += 1
            return
        _atomic_write(entry / "outblob", quote)
        self.quotes_served += 1  # before the bump: the backend returns as soon as it sees it
        self._set_gen(entry, gen + 1 if self.mode == "double_bump" else gen)

    def _set_gen(self, entry: Path, gen: int) -> None:
        self.generations[entry] = gen
        _atomic_write(entry / "generation", f"{gen}\n".encode())
