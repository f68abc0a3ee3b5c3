"""An image name from a request or the log never becomes a path outside the images dir: the
VMM's request checks refuse it naming the field, and each backend refuses it again before its
path join (the log may carry anything a writer outside its role put there)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest

from pydstack.adapters.cvm import CvmError, CvmSpec
from pydstack.adapters.qemu import QemuBackend, QemuBackendConfig
from pydstack.adapters.sandbox import load_image
from pydstack.adapters.sandbox.images import ImageNameError, list_images
from pydstack.adapters.supervisor import SupervisorClient
from pydstack.core.apps import BadInput, DeployRequest, plan_deploy
from pydstack.core.events import VmResources, VmUpdateRequested
from pydstack.core.projections import Vm
from pydstack.core.vmm import Refused, decide_update, image_name_error

BAD = [
    "",
    "..",
    "../etc",
    "../../../../etc/passwd",
    "a/../../b",
    "/etc",
    "/",
    "dstack-0.5.11/../../x",
    "dstack\x00-0.5.11",
    "dstack-0.5.11\n",
    ".hidden",
    "-rf",
    "a..b",
    "a/b",
    "a\\b",
    "x" * 129,
]
GOOD = ["dstack-0.5.11", "dstack-dev-0.5.3", "pydstack-dev", "sandbox-busybox", "a", "x" * 128]


@pytest.mark.parametrize("name", GOOD)
def test_dstack_image_names_are_accepted(name: str) -> None:
    assert image_name_error(name) is None


@pytest.mark.parametrize("name", BAD, ids=repr)
def test_traversal_absolute_nul_and_empty_names_are_refused_in_one_line(name: str) -> None:
    reason = image_name_error(name, "image")
    assert reason is not None and reason.startswith("image") and "\n" not in reason


@pytest.mark.parametrize("name", [n for n in BAD if n], ids=repr)
def test_update_request_with_a_bad_image_is_refused_naming_the_field(name: str) -> None:
    # The CLI checks updates without the host's image list (images=None): the name rule holds.
    vm = Vm(vm_id="vm1", app_id="a1", name="web", resources=VmResources(vcpu=1, memory_mb=256))
    with pytest.raises(Refused) as exc:
        decide_update(vm, None, None, VmUpdateRequested(vm_id="vm1", image=name),
                      current_disk_gb=0)  # fmt: skip
    assert exc.value.field == "image"


def test_deploy_with_a_traversal_image_is_refused_naming_the_field() -> None:
    compose = json.dumps({"manifest_version": 2, "name": "web", "runner": "docker-compose",
                          "docker_compose_file": "services: {}\n"})  # fmt: skip
    with pytest.raises(BadInput) as exc:
        plan_deploy(DeployRequest(app_compose=compose, image="../../victim"), vm_id="vm1")
    assert exc.value.field == "image"


def _sandbox_image(d: Path) -> None:
    d.mkdir(parents=True)
    (d / "metadata.json").write_bytes(msgspec.json.encode({"version": "1"}))


def test_sandbox_image_outside_the_images_dir_is_not_loaded(tmp_path: Path) -> None:
    _sandbox_image(tmp_path / "victim")  # a directory next to the images root
    (tmp_path / "images").mkdir()
    with pytest.raises(ImageNameError, match=re.escape("image '../victim'")):
        load_image(tmp_path / "images", "../victim")
    with pytest.raises(ImageNameError):
        load_image(tmp_path / "images", str(tmp_path / "victim"))


def test_sandbox_image_list_skips_directories_with_unsafe_names(tmp_path: Path) -> None:
    _sandbox_image(tmp_path / "ok-1.0")
    _sandbox_image(tmp_path / ".hidden")
    assert [i.name for i in list_images(tmp_path)] == ["ok-1.0"]


async def test_qemu_backend_refuses_a_log_image_name_outside_its_images_dir(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"  # a loadable image, but not under the backend's images dir
    victim.mkdir()
    for f in ("bzImage", "initrd"):
        (victim / f).write_bytes(b"x")
    (victim / "metadata.json").write_text(json.dumps({"kernel": "bzImage", "initrd": "initrd"}))
    (tmp_path / "images").mkdir()
    client = SupervisorClient(tmp_path / "sv.sock")  # never connected: refused before any I/O
    try:
        cfg = QemuBackendConfig(vms_dir=tmp_path / "vms", images=tmp_path / "images", vsock=False)
        backend = QemuBackend(cfg, client)
        for name in ("../victim", str(victim)):
            spec = CvmSpec(vm_id="vm1", image=name, vcpu=1, memory_mb=256)
            with pytest.raises(CvmError, match=r"^image "):
                backend.qemu_spec(spec)
            with pytest.raises(CvmError, match=r"^image "):
                await backend.create(spec)
        assert not (tmp_path / "vms" / "vm1").exists()
    finally:
        await client.close()
