"""The guest image of `make image`, built for the tests that boot it (test_qemu_deploy, the QEMU
backend contract). Built when missing or stale (image/build.sh skips a build with the same
inputs; after a code change only its last layer is redone, ~15 s here).

A host that cannot build it fails these tests instead of skipping them: `make test` runs on
root Debian machines with `make sysdeps` done, where the image can always be built, so a skip
would only hide a broken build (issue 15 item 10).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pydstack.adapters.qemu import Image

REPO = Path(__file__).resolve().parents[2]
IMAGE = "pydstack-dev"
TOOLS = ("qemu-system-x86_64", "mmdebstrap", "wireguard-go", "busybox")


def images_root() -> Path:
    """Where the harness's `up` looks: it runs without PYDSTACK_* variables."""
    return Path.home() / ".cache" / "pydstack" / "images"


@functools.cache  # one build check per session: the inputs do not change under a test run
def built_image() -> Image:
    """The verified image, built first if needed; a failure names what is missing."""
    if os.geteuid() != 0:
        pytest.fail("building the guest image (mmdebstrap, mkfs.ext4 -d) needs root")
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: the QEMU flow needs it (make sysdeps)")
    env = {k: v for k, v in os.environ.items() if k != "PYDSTACK_IMAGE_CACHE"}
    r = subprocess.run(["bash", str(REPO / "image" / "build.sh")], capture_output=True,
                       text=True, env=env)  # fmt: skip
    if r.returncode != 0:
        pytest.fail(f"the guest image cannot be built: {r.stderr.strip()[-300:]}")
    img = Image.load(images_root() / IMAGE)
    img.verify()
    return img
