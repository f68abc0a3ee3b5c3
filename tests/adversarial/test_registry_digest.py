"""A host-controlled registry cannot swap an image the measured compose pins by digest
(issue 15, item 5).

The registry (and any mirror) is the host's: it can move a tag to other content, and it can
serve other bytes under a digest it already stored. The compose file is measured (its hash
is the app's identity), so ``image: REGISTRY/app@sha256:<A>`` is what the app runs, or
nothing: here the host moves ``app:v1`` to image B and rewrites the stored manifest A with B's
bytes; the CVM's dockerd (pulling through the real relay and ``docker-registry``) refuses
it and the boot halts at ``app`` naming the digest, with no container started. The same
compose with the honest registry starts (the control case).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pydstack.adapters.cvm import CvmSpec
from pydstack.adapters.registry import LocalRegistry, push_rootfs
from pydstack.adapters.sandbox import SandboxBackend, SandboxConfig, build_busybox_image
from tests.cvm.contract import Host, wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("docker-registry") is None,
    reason="needs root, dockerd and docker-registry (make deps)",
)


def rootfs(busybox_tar: bytes, marker: str) -> bytes:
    """The busybox rootfs plus /marker (so A and B differ)."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(busybox_tar)) as src,
        tarfile.open(fileobj=out, mode="w") as dst,
    ):
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        info = tarfile.TarInfo("marker")
        info.size = len(marker)
        dst.addfile(info, io.BytesIO(marker.encode()))
    return out.getvalue()


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[tuple[SandboxBackend, LocalRegistry, Path]]:
    images = tmp_path / "images"
    build_busybox_image(images)
    async with LocalRegistry.start(tmp_path / "registry") as reg:
        cfg = SandboxConfig(vms_dir=tmp_path / "vms", images=images,
                            run_root=Path("/run/pydstack-test") / tmp_path.name,
                            registry_mirrors=(reg.url,))  # fmt: skip
        host = Host(tmp_path, lambda sv: SandboxBackend(cfg, sv))
        backend = await host.start()
        assert isinstance(backend, SandboxBackend)
        try:
            yield backend, reg, images / "sandbox-busybox" / "rootfs.tar"
        finally:
            await host.close()
            shutil.rmtree(cfg.run_root, ignore_errors=True)


def compose(image: str) -> bytes:
    text = (
        f"services:\n  app:\n    image: {image}\n"
        "    command: [sh, -c, 'cat /marker; exec sleep 600']\n"
    )
    return json.dumps({"name": "pinned", "docker_compose_file": text}).encode()


def blob(reg: LocalRegistry, digest: str) -> Path:
    h = digest.removeprefix("sha256:")
    return reg.storage / "docker/registry/v2/blobs/sha256" / h[:2] / h / "data"


async def test_a_digest_pinned_image_refuses_the_hosts_swapped_content(
    plane: tuple[SandboxBackend, LocalRegistry, Path],
) -> None:
    backend, reg, busybox = plane
    name = f"127.0.0.1:{reg.port}/app:v1"
    a = push_rootfs(reg.url, name, rootfs(busybox.read_bytes(), "A\n"))
    pinned = a.pinned  # what the app's measured compose names

    # Control: the honest registry serves A, the CVM runs it.
    await backend.create(CvmSpec(vm_id="ok", image="sandbox-busybox", vcpu=1, memory_mb=256,
                                 cid=1720, app_compose=compose(pinned)))  # fmt: skip
    await backend.start("ok")
    await wait_for(backend, "ok", lambda s: s.boot_stage in ("ready", "error"), 90)
    console = backend.log_path("ok").read_text()
    await backend.remove("ok")
    assert "[app] A" in console, console

    # The host moves the tag to B and serves B's manifest under A's digest.
    b = push_rootfs(reg.url, name, rootfs(busybox.read_bytes(), "B\n"))
    assert b.digest != a.digest
    blob(reg, a.digest).write_bytes(blob(reg, b.digest).read_bytes())

    await backend.create(CvmSpec(vm_id="swap", image="sandbox-busybox", vcpu=1, memory_mb=256,
                                 cid=1721, app_compose=compose(pinned)))  # fmt: skip
    await backend.start("swap")
    st = await wait_for(backend, "swap", lambda s: s.boot_stage in ("ready", "error"), 90)
    events, _ = await backend.events("swap")
    errors = [e.detail for e in events if e.stage == "error"]
    assert st.boot_stage == "error", events
    assert errors and "docker-compose up" in errors[0] and a.digest in errors[0], errors
    assert "[app]" not in backend.log_path("swap").read_text()  # nothing of B ran
