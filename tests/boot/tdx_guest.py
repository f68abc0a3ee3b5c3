"""A TDX guest for boot tests on a machine with no TDX: the guest's kernel interfaces in a temp
dir, played by `tests.tdx.kernel_emulation.EmulatedTdxKernel`.

Its configfs-tsm answers each inblob write with a quote over the TD's current RTMRs, signed
by `pki` (so the real verifier, in the KMS or the test, checks it), the TD measured as the
test image the KMS registered (`tests.images`: MRTD, RTMR0-2 of its boot log) and the CCEL
holding that boot log. The host share says what the test's host says (``platform.json``,
and, when `offer_dev_pki`, the simulated TD's files a TCG host would write).

    with tdx_guest(tmp, pki, platform="tdx") as g:
        td = open_td(g.share, shared, state_dir=g.state, name="t", vcpu=1, memory_mb=1024,
                     paths=g.paths)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydstack.adapters.tdx.backend import Rtmrs, TdxBackend
from pydstack.adapters.tdx.eventlog import TdxEvent, replay_rtmrs
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.simulator import QuoteSimulator, TdMeasurements
from pydstack.core.measure import simulated_boot_log
from pydstack.core.measure.simulated import simulated_mr_td
from pydstack_guest.tee import TeePaths
from tests import images
from tests.tdx.kernel_emulation import EmulatedTdxKernel, encode_ccel


@dataclass
class Guest:
    kernel: EmulatedTdxKernel | None  # None: the guest kernel has no configfs-tsm
    paths: TeePaths
    share: Path
    state: Path


def boot_events() -> list[TdxEvent]:
    """The test image's boot log (RTMR0-2) as its firmware would leave it."""
    log = simulated_boot_log(images.TEST_PARTS, images.TEST_SHAPE)
    return [TdxEvent(e.imr, e.event_type, e.digest, e.name, e.payload) for e in log]


def write_share(share: Path, *, platform: str | None, offer_dev_pki: DevPki | None = None) -> None:
    """What the host writes about the TEE: ``platform.json`` (none when `platform` is None),
    and with `offer_dev_pki` the simulated TD's dev PKI and ``dev-td.json``."""
    share.mkdir(parents=True, exist_ok=True)
    if platform is not None:
        doc = {"platform": platform, "os_image_hash": images.OS_IMAGE.hex()}
        (share / "platform.json").write_text(json.dumps(doc))
    if offer_dev_pki is not None:
        offer_dev_pki.save(share / "dev-pki")
        parts = {k: getattr(images.TEST_PARTS, k) for k in ("firmware", "kernel", "initrd",
                                                              "cmdline")}  # fmt: skip
        doc2 = {"os_image_hash": images.OS_IMAGE.hex(), "images": [], "image": parts}
        (share / "dev-td.json").write_text(json.dumps(doc2))


@contextmanager
def tdx_guest(
    root: Path, pki: DevPki, *, platform: str | None = "tdx",
    offer_dev_pki: DevPki | None = None, mode: str = "normal", configfs: bool = True,
    rtmr_sysfs: bool = True, tdx_cpu: bool = True,
) -> Iterator[Guest]:  # fmt: skip
    """A guest whose kernel has configfs-tsm (`configfs`), its quotes signed by `pki`, in a
    race `mode` of the emulated kernel, its CPU flagged ``tdx_guest`` (`tdx_cpu`); its host
    share as `write_share` makes it."""
    share, state, kroot = root / "share", root / "state", root / "kernel"
    state.mkdir(parents=True)
    write_share(share, platform=platform, offer_dev_pki=offer_dev_pki)
    events = boot_events()
    r = replay_rtmrs(events)
    td = TdMeasurements(mr_td=simulated_mr_td(images.TEST_PARTS), rtmrs=(r[0], r[1], r[2], r[3]))
    ccel, cpuinfo = root / "CCEL", root / "cpuinfo"
    ccel.write_bytes(encode_ccel(events))
    flags = "fpu sse2 hypervisor" + (" tdx_guest" if tdx_cpu else "")
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    if not configfs:
        paths = TeePaths(report_root=kroot / "tsm" / "report", measurements=kroot / "measurements",
                         ccel=ccel, cpuinfo=cpuinfo)  # fmt: skip
        yield Guest(None, paths, share, state)
        return
    with EmulatedTdxKernel(
        kroot, QuoteSimulator(pki), td=td, mode=mode, rtmr_sysfs=rtmr_sysfs
    ) as kernel:
        paths = TeePaths(report_root=kernel.report_root, measurements=kernel.measurements,
                         ccel=ccel, cpuinfo=cpuinfo)  # fmt: skip
        yield Guest(kernel, paths, share, state)


class Synchronous:
    """A `TdxBackend` forwarding to `inner`, waiting after each extend until the emulated
    kernel applied it: the real driver extends within the write(2), the emulator a moment
    later, and back-to-back extends (the boot's RTMR3 events) would otherwise overwrite each
    other in the emulator's file before it reads them. Quotes need no help (the backend waits
    on ``generation`` as it does on a real kernel)."""

    def __init__(self, inner: TdxBackend, kernel: EmulatedTdxKernel) -> None:
        self.inner, self.kernel = inner, kernel

    def get_quote(self, report_data: bytes) -> bytes:
        return self.inner.get_quote(report_data)

    def extend_rtmr(self, index: int, digest: bytes) -> None:
        self.inner.extend_rtmr(index, digest)
        self.kernel.settle()

    def read_rtmrs(self) -> Rtmrs:
        return self.inner.read_rtmrs()

    def record(self, event: TdxEvent) -> None:
        self.inner.record(event)
        self.kernel.settle()

    def emit_event(self, name: str, payload: bytes) -> TdxEvent:
        event = self.inner.emit_event(name, payload)
        self.kernel.settle()
        return event

    def event_log(self) -> list[TdxEvent]:
        return self.inner.event_log()

    def attest(self, report_data: bytes) -> tuple[bytes, list[TdxEvent]]:
        return self.inner.attest(report_data)
