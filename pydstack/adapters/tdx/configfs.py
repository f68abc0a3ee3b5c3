"""Real TDX guest backend: quotes through configfs-tsm, RTMRs through the TSM measurements sysfs.

Kernel interfaces (both paths configurable, so tests run against a temporary directory):

* Quotes, Linux >= 6.7, Documentation/ABI/testing/configfs-tsm:
  `/sys/kernel/config/tsm/report/<entry>/` holds `provider` (must start with "tdx_guest"),
  `inblob` (write the 64-byte report_data), `generation` (bumped by the kernel on every write)
  and `outblob` (read the quote). Like dstack's tdx-attest, we flock inblob, read the
  generation, write inblob, wait until the generation is exactly one higher, read outblob and
  check the generation did not move again: any other value means another process wrote the
  entry in between and the outblob may answer *its* report_data, so we refuse it.
* RTMRs, Linux >= 6.16, Documentation/ABI/testing/sysfs-devices-virtual-misc-tdx_guest:
  `/sys/devices/virtual/misc/tdx_guest/measurements/rtmr<N>:sha384`; a 48-byte write at
  offset 0 extends RTMR N, a read returns its current 48-byte value. Older kernels only have
  the `/dev/tdx_guest` TDX_CMD_EXTEND_RTMR ioctl, which this backend does not implement.

    backend = ConfigfsBackend(boot_events=parse_ccel(...))
    quote, log = backend.attest(report_data)
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Sequence
from pathlib import Path

from .backend import RecordingBackend, Rtmrs
from .errors import BackendError
from .eventlog import TdxEvent

TSM_REPORT_ROOT = "/sys/kernel/config/tsm/report"
TSM_MEASUREMENTS = "/sys/devices/virtual/misc/tdx_guest/measurements"
DEFAULT_ENTRY = "com.intel.dcap"  # the entry name dstack and Intel's library use
_MIN_QUOTE, _MAX_QUOTE = 1020, 64 * 1024  # a TDX quote with a PCK chain is ~5 KB


class ConfigfsBackend(RecordingBackend):
    """`TdxBackend` on a TDX guest kernel. Blocking; call from a worker thread in async code."""

    def __init__(
        self,
        *,
        report_root: str | os.PathLike[str] = TSM_REPORT_ROOT,
        entry: str = DEFAULT_ENTRY,
        measurements_dir: str | os.PathLike[str] = TSM_MEASUREMENTS,
        boot_events: Sequence[TdxEvent] = (),
        timeout: float = 5.0,
        poll_interval: float = 0.01,
    ) -> None:
        super().__init__(boot_events)
        self.report_root = Path(report_root)
        self.entry_dir = self.report_root / entry
        self.measurements_dir = Path(measurements_dir)
        self.timeout = timeout
        self.poll_interval = poll_interval

    def probe(self) -> str:
        """Check this guest can quote and extend before the boot relies on it: the report
        entry exists (created) with a ``tdx_guest`` provider, and the four RTMR files are
        there. Returns what was found, one line; raises `BackendError` naming what is not."""
        entry = self._entry()
        provider = self._read_text(entry / "provider").strip()
        missing = [i for i in range(4) if not self._rtmr_path(i).exists()]
        if missing:
            raise BackendError(
                f"no RTMR{missing[0]} at {self._rtmr_path(missing[0])}: RTMR extend through "
                "the TSM measurements sysfs needs Linux >= 6.16"
            )
        return f"configfs-tsm {entry} (provider {provider}), RTMRs at {self.measurements_dir}"

    # --- quotes -------------------------------------------------------------------------

    def _entry(self) -> Path:
        """The report entry, created on first use; its provider must be the TDX guest driver."""
        d = self.entry_dir
        if not d.is_dir():
            if not self.report_root.is_dir():
                raise BackendError(
                    f"no configfs-tsm at {self.report_root}: not a TDX guest, or configfs not "
                    "mounted (mount -t configfs none /sys/kernel/config)"
                )
            try:
                d.mkdir(exist_ok=True)
            except OSError as e:
                raise BackendError(f"cannot create configfs-tsm entry {d}: {e.strerror}") from e
        provider_file = d / "provider"
        deadline = time.monotonic() + self.timeout
        while not provider_file.exists():  # configfs fills a new entry right after mkdir
            if time.monotonic() >= deadline:
                raise BackendError(f"configfs-tsm entry {d} has no provider attribute")
            time.sleep(self.poll_interval)
        provider = self._read_text(provider_file).strip()
        if not provider.startswith("tdx_guest"):
            raise BackendError(
                f"configfs-tsm provider at {d} is {provider!r}, not tdx_guest: not a TDX guest"
            )
        return d

    def _read_text(self, path: Path) -> str:
        try:
            return path.read_text()
        except OSError as e:
            raise BackendError(f"cannot read {path}: {e.strerror}") from e

    def _generation(self, d: Path) -> int:
        text = self._read_text(d / "generation").strip()
        try:
            return int(text)
        except ValueError:
            raise BackendError(f"{d / 'generation'} holds {text!r}, not an integer") from None

    def _raw_quote(self, report_data: bytes) -> bytes:
        d = self._entry()
        try:
            fd = os.open(d / "inblob", os.O_WRONLY)
        except OSError as e:
            raise BackendError(f"cannot open {d / 'inblob'}: {e.strerror}") from e
        try:
            # flock serializes with other processes using the same entry (dstack does too).
            fcntl.flock(fd, fcntl.LOCK_EX)
            gen1 = self._generation(d)
            try:
                written = os.pwrite(fd, report_data, 0)
            except OSError as e:
                raise BackendError(f"write {d / 'inblob'} failed: {e.strerror}") from e
            if written != len(report_data):
                raise BackendError(f"short write to {d / 'inblob'}: {written} of 64 bytes")
            gen2 = self._wait_generation(d, gen1)
            if gen2 != gen1 + 1:
                raise BackendError(
                    f"configfs-tsm generation went {gen1} -> {gen2} for one inblob write: "
                    "another writer used the entry; retry"
                )
            try:
                quote = (d / "outblob").read_bytes()
            except OSError as e:
                raise BackendError(f"reading {d / 'outblob'} failed: {e.strerror}") from e
            gen3 = self._generation(d)
            if gen3 != gen2:
                raise BackendError(
                    f"configfs-tsm generation moved {gen2} -> {gen3} while reading outblob: "
                    "the quote may answer another report_data; retry"
                )
        finally:
            os.close(fd)  # also drops the flock
        if not _MIN_QUOTE < len(quote) < _MAX_QUOTE:
            raise BackendError(f"configfs-tsm returned a {len(quote)}-byte outblob, not a quote")
        return quote

    def _wait_generation(self, d: Path, old: int) -> int:
        # The kernel bumps generation synchronously with the write; the wait only matters
        # for emulations (tests) and costs nothing on a real kernel.
        deadline = time.monotonic() + self.timeout
        while True:
            gen = self._generation(d)
            if gen != old:
                return gen
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"configfs-tsm generation at {d} stayed {old} after writing inblob"
                )
            time.sleep(self.poll_interval)

    # --- RTMRs --------------------------------------------------------------------------

    def _rtmr_path(self, index: int) -> Path:
        return self.measurements_dir / f"rtmr{index}:sha384"

    def _raw_extend(self, index: int, digest: bytes) -> None:
        path = self._rtmr_path(index)
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as e:
            raise BackendError(
                f"cannot open {path}: {e.strerror} (RTMR extend needs Linux >= 6.16)"
            ) from e
        try:
            # The kernel demands one 48-byte write at offset 0 (EINVAL otherwise).
            if os.pwrite(fd, digest, 0) != len(digest):
                raise BackendError(f"short write extending RTMR{index} via {path}")
        except OSError as e:
            raise BackendError(f"extending RTMR{index} via {path} failed: {e.strerror}") from e
        finally:
            os.close(fd)

    def read_rtmrs(self) -> Rtmrs:
        values: list[bytes] = []
        with self._lock:
            for i in range(4):
                path = self._rtmr_path(i)
                try:
                    value = path.read_bytes()
                except OSError as e:
                    raise BackendError(f"cannot read RTMR{i} from {path}: {e.strerror}") from e
                if len(value) != 48:
                    raise BackendError(f"{path} returned {len(value)} bytes, want 48")
                values.append(value)
        return (values[0], values[1], values[2], values[3])
