"""The VM shape a measurement depends on, from a request's ``vm_config``. Pure.

dstack's VMM writes the shape into ``vm_config`` (sys-config) and its KMS recomputes the
expected measurements for it; the host writes it, so it is a claim, which the comparison with
the quote then proves or refutes. Only the fields that change a measurement are kept.
"""

from __future__ import annotations

import json

import msgspec

MAX_CPUS = 1024
MAX_MEMORY = 1 << 46  # 64 TiB


class ShapeError(ValueError):
    """A vm_config without a usable shape."""


class VmShape(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    cpu_count: int
    memory_size: int  # bytes
    hugepages: bool = False
    num_gpus: int = 0
    num_nvswitches: int = 0
    hotplug_off: bool = False

    def text(self) -> str:
        extra = "".join(
            f", {label}" for label, on in (
                ("hugepages", self.hugepages), (f"{self.num_gpus} GPU", self.num_gpus),
                (f"{self.num_nvswitches} NVSwitch", self.num_nvswitches),
                ("hotplug off", self.hotplug_off),
            ) if on
        )  # fmt: skip
        return f"{self.cpu_count} vCPU, {self.memory_size >> 20} MiB{extra}"


def _int(doc: dict[str, object], name: str, low: int, high: int, default: int | None) -> int:
    value = doc.get(name, default)
    if value is None:
        raise ShapeError(f"vm_config has no {name}")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ShapeError(f"vm_config {name} {value!r} is not an integer in {low}..{high}")
    return value


def _bool(doc: dict[str, object], name: str) -> bool:
    value = doc.get(name, False)
    if not isinstance(value, bool):
        raise ShapeError(f"vm_config {name} {value!r} is not a boolean")
    return value


def shape_of_vm_config(vm_config: str) -> VmShape:
    """The shape in a vm_config JSON (or in the ``vm_config`` string a sys-config nests)."""
    try:
        doc = json.loads(vm_config or "{}")
        if isinstance(doc, dict) and isinstance(doc.get("vm_config"), str):
            doc = json.loads(doc["vm_config"])
    except ValueError:
        raise ShapeError("vm_config is not JSON") from None
    if not isinstance(doc, dict):
        raise ShapeError("vm_config is not a JSON object")
    return VmShape(
        cpu_count=_int(doc, "cpu_count", 1, MAX_CPUS, None),
        memory_size=_int(doc, "memory_size", 1 << 20, MAX_MEMORY, None),
        hugepages=_bool(doc, "hugepages"),
        num_gpus=_int(doc, "num_gpus", 0, 64, 0),
        num_nvswitches=_int(doc, "num_nvswitches", 0, 64, 0),
        hotplug_off=_bool(doc, "hotplug_off"),
    )
