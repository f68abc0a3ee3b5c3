"""The KMS's image check (pure): what passes, and each way a request is refused, by name."""

from __future__ import annotations

import hashlib
import json

import msgspec
import pytest

from pydstack.core.events import ImageRegistered, ImageRevoked, ShapeMeasurements
from pydstack.core.measure import (
    ImageParts,
    Measured,
    ShapeError,
    VmShape,
    check_image,
    shape_of_vm_config,
    simulated_measurements,
)
from pydstack.core.measure.check import latest_image, registration_problem

SUMS = "aa" * 32 + "  rootfs.tar\n"
HASH = hashlib.sha256(SUMS.encode()).hexdigest()


def _d(label: str) -> str:
    return hashlib.sha384(label.encode()).hexdigest()


IMAGE = ImageRegistered(os_image_hash=HASH, name="busybox", sha256sum=SUMS,
                        firmware=_d("fw"), kernel=_d("k"), initrd=_d("i"))  # fmt: skip
PARTS = ImageParts(firmware=_d("fw"), kernel=_d("k"), initrd=_d("i"))
SHAPE = VmShape(cpu_count=2, memory_size=1 << 30)
VM_CONFIG = json.dumps({"os_image_hash": HASH, "cpu_count": 2, "memory_size": 1 << 30})
GOOD = simulated_measurements(PARTS, SHAPE)


def test_a_td_measured_as_the_registered_image_passes_and_says_what_it_checked() -> None:
    verdict = check_image(IMAGE, HASH, VM_CONFIG, GOOD, simulated=True)
    assert verdict.ok and verdict.reasons == ()
    assert "busybox" in verdict.summary and "2 vCPU, 1024 MiB" in verdict.summary
    assert "simulated" in verdict.summary


def test_an_unregistered_image_is_refused() -> None:
    verdict = check_image(None, HASH, VM_CONFIG, GOOD, simulated=True)
    assert not verdict.ok and "not registered on the log" in verdict.reasons[0]


def test_no_image_named_is_refused() -> None:
    verdict = check_image(IMAGE, "", VM_CONFIG, GOOD, simulated=True)
    assert not verdict.ok and "names none" in verdict.reasons[0]


def test_another_images_measurements_are_refused_naming_each_register() -> None:
    other = simulated_measurements(msgspec.structs.replace(PARTS, kernel=_d("evil")), SHAPE)
    verdict = check_image(IMAGE, HASH, VM_CONFIG, other, simulated=True)
    assert not verdict.ok
    assert len(verdict.reasons) == 1 and "RTMR1 is" in verdict.reasons[0]
    assert "the image gives" in verdict.reasons[0]


def test_a_lie_about_the_shape_is_refused() -> None:
    lie = json.dumps({"os_image_hash": HASH, "cpu_count": 8, "memory_size": 1 << 30})
    verdict = check_image(IMAGE, HASH, lie, GOOD, simulated=True)
    assert not verdict.ok and any("RTMR0" in r for r in verdict.reasons)


def test_tdx_uses_the_measurements_registered_for_the_shape() -> None:
    tdx = ShapeMeasurements(cpu_count=2, memory_size=1 << 30, mr_td="01" * 48,
                            rtmr0="02" * 48, rtmr1="03" * 48, rtmr2="04" * 48)  # fmt: skip
    image = msgspec.structs.replace(IMAGE, tdx=(tdx,))
    real = Measured(b"\x01" * 48, b"\x02" * 48, b"\x03" * 48, b"\x04" * 48)
    assert check_image(image, HASH, VM_CONFIG, real, simulated=False).ok
    # the simulator's rule never stands in for TDX
    assert not check_image(image, HASH, VM_CONFIG, GOOD, simulated=False).ok
    bigger = json.dumps({"os_image_hash": HASH, "cpu_count": 4, "memory_size": 1 << 30})
    verdict = check_image(image, HASH, bigger, real, simulated=False)
    assert not verdict.ok and "no TDX measurements registered for 4 vCPU" in verdict.reasons[0]


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ({}, "no cpu_count"),
        ({"cpu_count": 2}, "no memory_size"),
        ({"cpu_count": True, "memory_size": 1 << 30}, "cpu_count True"),
        ({"cpu_count": 0, "memory_size": 1 << 30}, "cpu_count 0"),
        ({"cpu_count": 2, "memory_size": 1 << 60}, "memory_size"),
        ({"cpu_count": 2, "memory_size": 1 << 30, "hugepages": "yes"}, "hugepages"),
    ],
)
def test_a_vm_config_without_a_sound_shape_is_refused(doc: dict[str, object], why: str) -> None:
    with pytest.raises(ShapeError, match=why):
        shape_of_vm_config(json.dumps(doc))
    verdict = check_image(IMAGE, HASH, json.dumps(doc), GOOD, simulated=True)
    assert not verdict.ok and why in verdict.reasons[0]


def test_the_shape_nested_in_a_sys_config_is_read() -> None:
    nested = json.dumps({"vm_config": VM_CONFIG})
    assert shape_of_vm_config(nested) == SHAPE


def test_a_registration_must_prove_its_hash_and_digests() -> None:
    assert registration_problem(IMAGE, HASH) is None
    assert "subject" in (registration_problem(IMAGE, "00" * 32) or "")
    forged = msgspec.structs.replace(IMAGE, sha256sum="bb" * 32 + "  rootfs.tar\n")
    assert "sha256 of the sha256sum" in (registration_problem(forged, HASH) or "")
    short = msgspec.structs.replace(IMAGE, firmware="00")
    assert "firmware digest" in (registration_problem(short, HASH) or "")
    bad_tdx = ShapeMeasurements(cpu_count=2, memory_size=1 << 30, mr_td="zz" * 48,
                                rtmr0="02" * 48, rtmr1="03" * 48, rtmr2="04" * 48)  # fmt: skip
    broken = msgspec.structs.replace(IMAGE, tdx=(bad_tdx,))
    assert "MRTD for 2 vCPU" in (registration_problem(broken, HASH) or "")
    assert latest_image([broken], HASH) is None  # never compared, never crashes a reader


def test_the_latest_sound_registration_counts_and_a_revocation_ends_it() -> None:
    newer = msgspec.structs.replace(IMAGE, version="2")
    broken = msgspec.structs.replace(IMAGE, kernel="zz")
    assert latest_image([IMAGE, newer, broken], HASH) == newer
    revoked = ImageRevoked(os_image_hash=HASH, reason="CVE")
    assert latest_image([IMAGE, revoked], HASH) is None
    assert latest_image([IMAGE, revoked, newer], HASH) == newer
