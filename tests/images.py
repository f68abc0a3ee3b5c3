"""A guest image for tests that ask a real KMS for keys: registered on the log, and simulated
TDs measured from it (the KMS refuses any other image, or these measurements in another shape).

    await register_test_image(store)
    backend = measured_backend(pki)                 # 1 vCPU, 1 GiB: TEST_VM_CONFIG's shape
"""

from __future__ import annotations

import hashlib
import json

from pydstack.adapters.nats import EventStore
from pydstack.adapters.tdx.backend import SimulatorBackend, measured_simulator
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.simulator import QuoteSimulator, TdMeasurements
from pydstack.core.events import ImageRegistered, subject
from pydstack.core.measure import ImageParts, VmShape

SHA256SUM = f"{hashlib.sha256(b'test rootfs').hexdigest()}  rootfs.tar\n"
TEST_IMAGE = ImageRegistered(
    os_image_hash=hashlib.sha256(SHA256SUM.encode()).hexdigest(),
    name="test-image",
    sha256sum=SHA256SUM,
    firmware=hashlib.sha384(b"test firmware").hexdigest(),
    kernel=hashlib.sha384(b"test kernel").hexdigest(),
    initrd=hashlib.sha384(b"test initrd").hexdigest(),
    cmdline="console=ttyS0",
)
TEST_PARTS = ImageParts(firmware=TEST_IMAGE.firmware, kernel=TEST_IMAGE.kernel,
                        initrd=TEST_IMAGE.initrd, cmdline=TEST_IMAGE.cmdline)  # fmt: skip
OS_IMAGE = bytes.fromhex(TEST_IMAGE.os_image_hash)
TEST_SHAPE = VmShape(cpu_count=1, memory_size=1 << 30)
TEST_VM_CONFIG = json.dumps(
    {"os_image_hash": OS_IMAGE.hex(), "cpu_count": 1, "memory_size": TEST_SHAPE.memory_size}
)


async def register_test_image(store: EventStore, image: ImageRegistered = TEST_IMAGE) -> None:
    """Put `image` on the log with `store`'s signer (an admin's, or any before a keyring)."""
    subj = subject("image", image.os_image_hash)
    _, version = await store.read_aggregate(subj)
    await store.append(subj, [image], version)


def measured_backend(
    pki: DevPki, *, parts: ImageParts = TEST_PARTS, shape: VmShape = TEST_SHAPE,
    mr_config_id: bytes = bytes(48), td: TdMeasurements | None = None,
) -> SimulatorBackend:  # fmt: skip
    """A simulated TD booted from `parts` in a VM of `shape`; `td`: other report fields."""
    return measured_simulator(QuoteSimulator(pki), parts, shape, mr_config_id=mr_config_id,
                              td=td)  # fmt: skip
