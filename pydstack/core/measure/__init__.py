"""What a VM's measurements must be, from its image and its shape. Pure.

A TD's MRTD and RTMR0-2 are a function of the image it boots (firmware, kernel, initrd,
command line) and of the VM's shape (vCPUs, memory, devices), as dstack's ``dstack-mr``
computes them. The KMS compares the quote's values with the expected ones of the image the
request names, so an ``os_image_hash`` is believed only when the measurements prove it.

- ``shape``: the VM shape, parsed from a request's ``vm_config``;
- ``simulated``: the simulator's measurement rule (hosts without TDX);
- ``check``: the comparison the KMS (and ``pydstack audit``) applies;
- ``tdx``: dstack-mr's computation for real TDX.
"""

from __future__ import annotations

from .check import ImageCheck, ShapeMeasurements, check_image, expected_for
from .shape import ShapeError, VmShape, shape_of_vm_config
from .simulated import BootEntry, ImageParts, Measured, simulated_boot_log, simulated_measurements

__all__ = [
    "BootEntry",
    "ImageCheck",
    "ImageParts",
    "Measured",
    "ShapeError",
    "ShapeMeasurements",
    "VmShape",
    "check_image",
    "expected_for",
    "shape_of_vm_config",
    "simulated_boot_log",
    "simulated_measurements",
]
