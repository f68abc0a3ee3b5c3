"""The KMS's image check: is the quote's MRTD and RTMR0-2 what the named image gives? Pure.

The request names its image (``os_image_hash`` in ``vm_config``, host-written) and its shape;
neither is believed until the quote's measurements equal the expected ones of that image for
that shape (dstack's KMS recomputes them with dstack-mr before asking its authorization
backend). Expected values: the simulator's rule (``simulated``) for simulated quotes; for real
TDX the values registered for the shape (computed with dstack-mr or ``core.measure.tdx``).

    verdict = check_image(latest_image(events), os_image_hash, vm_config, measured,
                          simulated=True)
    if not verdict.ok: deny("; ".join(verdict.reasons))
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import msgspec

from pydstack.core.events.images import ImageRegistered, ImageRevoked, ShapeMeasurements

from .shape import ShapeError, VmShape, shape_of_vm_config
from .simulated import ImageParts, Measured, simulated_measurements

__all__ = [
    "ImageCheck", "ShapeMeasurements", "check_image", "expected_for", "image_at", "latest_image",
]  # fmt: skip

_FIELDS = ("mr_td", "rtmr0", "rtmr1", "rtmr2")
_LABEL = {"mr_td": "MRTD", "rtmr0": "RTMR0", "rtmr1": "RTMR1", "rtmr2": "RTMR2"}


class ImageCheck(msgspec.Struct, frozen=True):
    ok: bool
    reasons: tuple[str, ...]
    summary: str  # one line for the log and the audit, pass or fail


def registration_problem(e: ImageRegistered, aggregate_id: str) -> str | None:
    """Why an ImageRegistered cannot be believed as stored (None: it can)."""
    if e.os_image_hash != aggregate_id:
        return f"os_image_hash {e.os_image_hash[:16]} is not its subject's {aggregate_id[:16]}"
    if e.sha256sum and hashlib.sha256(e.sha256sum.encode()).hexdigest() != e.os_image_hash:
        return "os_image_hash is not sha256 of the sha256sum it carries"
    for m in e.tdx:  # malformed values would raise where the KMS or an auditor compares
        for f in _FIELDS:
            value = getattr(m, f)
            if len(value) != 96 or any(c not in "0123456789abcdef" for c in value):
                return f"tdx {_LABEL[f]} for {m.cpu_count} vCPU is not 48 bytes of lowercase hex"
    return ImageParts(firmware=e.firmware, kernel=e.kernel, initrd=e.initrd,
                      cmdline=e.cmdline).problem()  # fmt: skip


def latest_image(events: Iterable[object], aggregate_id: str) -> ImageRegistered | None:
    """The image as its (admitted) events leave it: the last sound registration, None once
    revoked after it."""
    image: ImageRegistered | None = None
    for e in events:
        if isinstance(e, ImageRegistered) and registration_problem(e, aggregate_id) is None:
            image = e
        elif isinstance(e, ImageRevoked):
            image = None
    return image


def image_at(
    records: Iterable[tuple[int, str, object]], os_image_hash: str, before: int
) -> ImageRegistered | None:
    """The image as the admitted records ``(seq, subject, event)`` left it before seq
    `before`: what a KMS deciding then could read (an auditor's re-check)."""
    subj = f"dstack.image.{os_image_hash}"
    return latest_image((e for s, sj, e in records if sj == subj and s < before), os_image_hash)


def _shape_of(m: ShapeMeasurements) -> VmShape:
    return VmShape(cpu_count=m.cpu_count, memory_size=m.memory_size, hugepages=m.hugepages,
                   num_gpus=m.num_gpus, num_nvswitches=m.num_nvswitches,
                   hotplug_off=m.hotplug_off)  # fmt: skip


def expected_for(image: ImageRegistered, shape: VmShape, *, simulated: bool) -> Measured | None:
    """The image's measurements for `shape`; None when none are registered (TDX)."""
    if simulated:
        parts = ImageParts(firmware=image.firmware, kernel=image.kernel, initrd=image.initrd,
                           cmdline=image.cmdline)  # fmt: skip
        return simulated_measurements(parts, shape)
    for m in image.tdx:
        if _shape_of(m) == shape:
            return Measured(*(bytes.fromhex(getattr(m, f)) for f in _FIELDS))
    return None


def _h(b: bytes | str) -> str:
    text = b.hex() if isinstance(b, bytes) else b
    return text[:16] + "…"


def check_image(
    image: ImageRegistered | None, os_image_hash: str, vm_config: str, actual: Measured,
    *, simulated: bool,
) -> ImageCheck:  # fmt: skip
    """Compare the quote's `actual` measurements with the image's for the claimed shape."""
    kind = "simulated" if simulated else "TDX"
    if not os_image_hash:
        return ImageCheck(False, ("os image: the request names none (vm_config os_image_hash)",),
                          "os image: none named")  # fmt: skip
    label = f"os image {_h(os_image_hash)}"
    if image is None:
        why = f"{label} is not registered on the log (pydstack image register)"
        return ImageCheck(False, (why,), why)
    label = f"os image {image.name} {_h(os_image_hash)}"
    try:
        shape = shape_of_vm_config(vm_config)
    except ShapeError as e:
        return ImageCheck(False, (f"{label}: {e}",), f"{label}: no shape")
    expected = expected_for(image, shape, simulated=simulated)
    if expected is None:
        why = f"{label} has no TDX measurements registered for {shape.text()}"
        return ImageCheck(False, (why,), why)
    reasons = tuple(
        f"{label}: {_LABEL[f]} is {_h(getattr(actual, f))}, the image gives "
        f"{_h(getattr(expected, f))} for {shape.text()} ({kind})"
        for f in _FIELDS
        if getattr(actual, f) != getattr(expected, f)
    )
    if reasons:
        return ImageCheck(False, reasons, f"{label}: measurements do not match ({kind})")
    return ImageCheck(True, (), f"{label}: MRTD, RTMR0-2 match for {shape.text()} ({kind})")
