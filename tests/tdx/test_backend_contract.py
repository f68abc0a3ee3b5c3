"""One contract for every TdxBackend: the simulator, and configfs-tsm on an emulated kernel.

Plus the configfs protocol checks (provider, generation races, timeouts) that only the real
backend has.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pydstack.adapters.tdx.backend import RecordingBackend, SimulatorBackend
from pydstack.adapters.tdx.configfs import ConfigfsBackend
from pydstack.adapters.tdx.errors import BackendError
from pydstack.adapters.tdx.eventlog import replay_rtmrs, runtime_event_digest
from pydstack.adapters.tdx.quote import parse_quote
from pydstack.adapters.tdx.verify import Policy, verify_quote

from .kernel_emulation import EmulatedTdxKernel
from .sim_support import NOW, dev_collateral, dev_pki, dev_sim

D = hashlib.sha384(b"digest").digest()


class BackendContract:
    """Behaviour every backend must show. Subclasses provide `backend` and `settle`."""

    def settle(self) -> None:
        """Let an asynchronous (emulated) kernel catch up; the real kernel is synchronous."""

    def test_quote_carries_padded_report_data_and_verifies(self, backend: RecordingBackend) -> None:
        """get_quote pads report_data to 64 bytes and the quote verifies with the dev root."""
        quote = backend.get_quote(b"nonce")
        v = verify_quote(
            quote, dev_collateral(), Policy(report_data=b"nonce"), NOW, dev_pki().root_der
        )
        assert v.ok, v.reasons

    def test_report_data_over_64_bytes_refused(self, backend: RecordingBackend) -> None:
        """More than 64 bytes of report_data is an error, not a truncation."""
        with pytest.raises(BackendError, match="at most 64 bytes"):
            backend.get_quote(bytes(65))

    def test_extend_is_sha384_chain(self, backend: RecordingBackend) -> None:
        """extend_rtmr(2, d) turns RTMR2 into sha384(old || d) and leaves the others alone."""
        before = backend.read_rtmrs()
        backend.extend_rtmr(2, D)
        self.settle()
        after = backend.read_rtmrs()
        assert after[2] == hashlib.sha384(before[2] + D).digest()
        assert (after[0], after[1], after[3]) == (before[0], before[1], before[3])

    def test_bad_extend_refused(self, backend: RecordingBackend) -> None:
        """Index outside 0-3 and digests that are not 48 bytes are refused."""
        with pytest.raises(BackendError, match="RTMR index must be 0-3"):
            backend.extend_rtmr(4, D)
        with pytest.raises(BackendError, match="must be 48 bytes"):
            backend.extend_rtmr(3, b"short")

    def test_emit_event_logs_and_replays(self, backend: RecordingBackend) -> None:
        """emit_event appends a runtime event with dstack's digest; attest's log replays to
        the quote's RTMRs and verify_quote accepts it with that log."""
        ev = backend.emit_event("app-id", b"\x01" * 20)
        assert ev.imr == 3 and ev.digest == runtime_event_digest("app-id", b"\x01" * 20)
        quote, log = backend.attest(b"")
        assert log[-1] == ev
        assert replay_rtmrs(log) == parse_quote(quote).report.rtmrs
        v = verify_quote(quote, dev_collateral(), Policy(), NOW, dev_pki().root_der, event_log=log)
        assert v.ok, v.reasons


class TestSimulatorBackend(BackendContract):
    @pytest.fixture
    def backend(self) -> SimulatorBackend:
        return SimulatorBackend(dev_sim())

    def test_boot_log_replays_to_initial_rtmrs(self, backend: SimulatorBackend) -> None:
        """The simulated boot log (IMR 0-2) replays to the starting RTMRs; RTMR3 is zero."""
        log = backend.event_log()
        assert {e.imr for e in log} == {0, 1, 2}
        assert replay_rtmrs(log) == backend.read_rtmrs()
        assert backend.read_rtmrs()[3] == bytes(48)

    def test_concurrent_emit_and_attest_always_replay(self, backend: SimulatorBackend) -> None:
        """50 threads emitting and attesting: every quote replays to the log returned with it."""

        def work(i: int) -> tuple[bytes, list]:  # type: ignore[type-arg]
            backend.emit_event(f"event-{i}", i.to_bytes(4, "little"))
            return backend.attest(i.to_bytes(8, "little"))

        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(work, range(50)))
        for quote, log in results:
            assert replay_rtmrs(log) == parse_quote(quote).report.rtmrs
        assert len(backend.event_log()) == 8 + 50


class TestConfigfsBackend(BackendContract):
    kernel: EmulatedTdxKernel

    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[ConfigfsBackend]:
        with EmulatedTdxKernel(tmp_path, dev_sim()) as kernel:
            self.kernel = kernel
            yield ConfigfsBackend(
                report_root=kernel.report_root,
                measurements_dir=kernel.measurements,
                timeout=2.0,
                poll_interval=0.001,
            )

    def settle(self) -> None:
        self.kernel.settle()

    def test_entry_created_and_report_data_reaches_kernel(self, backend: ConfigfsBackend) -> None:
        """The backend mkdirs its entry and the kernel side sees the padded inblob."""
        quote = backend.get_quote(b"\xaa")
        assert (self.kernel.report_root / "com.intel.dcap" / "provider").exists()
        assert parse_quote(quote).report.report_data == b"\xaa" + bytes(63)
        assert self.kernel.quotes_served == 1

    def test_concurrent_quotes_each_answer_their_report_data(
        self, backend: ConfigfsBackend
    ) -> None:
        """Concurrent get_quote calls are serialized: each quote carries its own report_data."""
        with ThreadPoolExecutor(max_workers=8) as pool:
            quotes = list(pool.map(lambda i: backend.get_quote(bytes([i])), range(20)))
        for i, q in enumerate(quotes):
            assert parse_quote(q).report.report_data[:1] == bytes([i])


def _emulated(
    tmp_path: Path,
    *,
    provider: str = "tdx_guest\n",
    mode: str = "normal",
    outblob: bytes | None = None,
) -> tuple[EmulatedTdxKernel, ConfigfsBackend]:
    kernel = EmulatedTdxKernel(tmp_path, dev_sim(), provider=provider, mode=mode, outblob=outblob)
    backend = ConfigfsBackend(
        report_root=kernel.report_root,
        measurements_dir=kernel.measurements,
        timeout=0.5,
        poll_interval=0.001,
    )
    return kernel, backend


def test_generation_jump_is_detected(tmp_path: Path) -> None:
    """If generation moves by more than one for our write, another writer interfered."""
    kernel, backend = _emulated(tmp_path, mode="double_bump")
    with kernel, pytest.raises(BackendError, match=r"generation went 0 -> 2"):
        backend.get_quote(b"x")


def test_generation_move_during_outblob_read_is_detected(tmp_path: Path) -> None:
    """A generation change while outblob is read means the quote may not be ours."""
    kernel, backend = _emulated(tmp_path, mode="bump_during_read")
    with kernel, pytest.raises(BackendError, match=r"moved 1 -> 2 while reading outblob"):
        backend.get_quote(b"x")


def test_no_generation_change_times_out(tmp_path: Path) -> None:
    """A kernel that never answers gives a timeout error, not a hang."""
    kernel, backend = _emulated(tmp_path, mode="silent")
    with kernel, pytest.raises(BackendError, match="stayed 0 after writing inblob"):
        backend.get_quote(b"x")


def test_wrong_provider_refused(tmp_path: Path) -> None:
    """An entry served by another TSM provider (e.g. SEV-SNP) is refused."""
    kernel, backend = _emulated(tmp_path, provider="sev_guest\n")
    with kernel, pytest.raises(BackendError, match=r"provider .* is 'sev_guest'"):
        backend.get_quote(b"x")


def test_tiny_outblob_refused(tmp_path: Path) -> None:
    """An outblob too small to be a quote is refused."""
    kernel, backend = _emulated(tmp_path, outblob=b"\x00" * 100)
    with kernel, pytest.raises(BackendError, match="100-byte outblob"):
        backend.get_quote(b"x")


def test_missing_configfs_is_explained(tmp_path: Path) -> None:
    """Without configfs-tsm the error says this is not a TDX guest or configfs is unmounted."""
    backend = ConfigfsBackend(report_root=tmp_path / "absent", measurements_dir=tmp_path)
    with pytest.raises(BackendError, match="not a TDX guest"):
        backend.get_quote(b"x")
    with pytest.raises(BackendError, match=r"Linux >= 6\.16"):
        backend.extend_rtmr(3, D)


def test_emulated_kernel_extends_from_written_digest(tmp_path: Path) -> None:
    """The extend reaches the kernel as one 48-byte write to rtmr3:sha384 and the recorded
    log replays to what the kernel then reports."""
    kernel, backend = _emulated(tmp_path)
    with kernel:
        backend.emit_event("compose-hash", b"\x02" * 32)
        kernel.settle()
        assert (
            kernel.rtmrs[3]
            == hashlib.sha384(
                bytes(48) + runtime_event_digest("compose-hash", b"\x02" * 32)
            ).digest()
        )
        assert replay_rtmrs(backend.event_log()) == tuple(kernel.rtmrs)
