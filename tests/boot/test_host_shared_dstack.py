"""The host-shared files as dstack v0.5.11 names and shapes them (issue 16 item 5): our VMM
writes what a dstack guest reads, and our guest reads what a dstack VMM writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pydstack.actors.vmm._workdir import build_spec
from pydstack.adapters import cvm
from pydstack.adapters.cvm_supervised import SupervisedCvms
from pydstack.core.events import VmRequested, VmResources
from pydstack.core.projections import Applied
from pydstack.core.vmm import VmRecord, record
from pydstack_guest import host_shared
from pydstack_guest.boot import plan_boot, read_host_shared

VECTORS = Path(__file__).parents[1] / "vectors" / "dstack"
# dstack-types v0.5.11 SysConfig / VmConfig / dstack-util InstanceInfo: field -> JSON types its
# serde accepts (Option = null too). VmConfig's fields all have serde defaults.
SYS_CONFIG = {"kms_urls": (list,), "gateway_urls": (list,), "pccs_url": (str, type(None)),
              "docker_registry": (str, type(None)), "host_api_url": (str, type(None)),
              "vm_config": (str,)}  # fmt: skip
VM_CONFIG_ORDER = ["os_image_hash", "cpu_count", "memory_size", "pci_hole64_size", "hugepages",
                   "num_gpus", "num_nvswitches", "hotplug_off", "image", "host_share_mode",
                   "spec_version"]  # fmt: skip


def _rec(**kw: Any) -> VmRecord:
    e = VmRequested(vm_id="v1", app_id="ab" * 20, name="w", image="dstack-0.5.11",
                    compose=b'{"manifest_version":2}', resources=VmResources(vcpu=2,
                    memory_mb=1024), **kw)  # fmt: skip
    rec = record.apply(None, Applied(seq=1, id="e1", event=e, time_ns=1))
    assert rec is not None
    return rec


def test_the_names_are_dstacks_on_both_sides() -> None:
    """dstack-types shared_filenames, the same on the host (adapters.cvm) and in the guest."""
    assert (cvm.SYS_CONFIG, cvm.INSTANCE_INFO, cvm.ENCRYPTED_ENV, cvm.USER_CONFIG) == (
        ".sys-config.json",
        ".instance_info",
        ".encrypted-env",
        ".user-config",
    )
    assert set(cvm.SHARED_NAMES) == set(host_shared.FILES)
    assert host_shared.APP_KEYS == ".appkeys.json"


def test_the_vmm_writes_dstacks_files_in_dstacks_shapes() -> None:
    spec = build_spec(_rec(encrypted_env=b"\x00\x01sealed", user_config="cfg"), {},
                      kms_urls=("https://kms:1",), gateway_ca="PEM")  # fmt: skip
    files = spec.shared_files
    assert sorted(files) == sorted([".sys-config.json", ".instance_info", ".encrypted-env",
                                    ".user-config"])  # fmt: skip
    assert files[".encrypted-env"] == b"\x00\x01sealed" and files[".user-config"] == b"cfg"
    sysc = json.loads(files[".sys-config.json"])
    for name, types in SYS_CONFIG.items():
        assert isinstance(sysc[name], types), name
    assert set(sysc) - set(SYS_CONFIG) == {"gateway_ca"}  # pydstack's; serde ignores it
    assert sysc["pccs_url"] is None and sysc["kms_urls"] == ["https://kms:1"]
    vm_config = json.loads(sysc["vm_config"])
    assert list(vm_config) == VM_CONFIG_ORDER
    assert (vm_config["cpu_count"], vm_config["memory_size"]) == (2, 1024 << 20)
    info = json.loads(files[".instance_info"])
    assert list(info) == ["instance_id_seed", "instance_id", "app_id"]
    assert all(len(bytes.fromhex(v)) == 20 for v in info.values())  # hex_bytes, 20 bytes each


def test_our_guest_reads_a_share_as_dstacks_vmm_writes_it(tmp_path: Path) -> None:
    """A dstack VMM's share: the sys-config a dstack CVM attested (attestation.bin's config),
    .instance_info with app_id only (prepare_work_dir), and vmm-cli's app-compose."""
    att = json.loads((VECTORS / "attestation.decoded.json").read_text())
    compose = (VECTORS / "app-compose" / "out" / "deploy-default.json").read_bytes()
    (tmp_path / "app-compose.json").write_bytes(compose)
    (tmp_path / ".sys-config.json").write_text(att["config"])
    (tmp_path / ".instance_info").write_text(json.dumps({"app_id": "5b" * 20}))
    (tmp_path / ".encrypted-env").write_bytes(b"\x01" * 80)
    (tmp_path / ".user-config").write_text("hello")
    shared = read_host_shared(tmp_path)
    assert (shared.encrypted_env, shared.user_config) == (b"\x01" * 80, "hello")
    plan = plan_boot(shared)
    assert plan.kms_urls == ("https://kms.tdxlab.dstack.org:12001",)
    assert plan.app_id == bytes.fromhex("5b" * 20)  # a KMS app: the host's app id, as dstack
    assert plan.sys_config.host_api_url == "vsock://2:12000/api"
    assert json.loads(plan.sys_config.vm_config)["image"] == "dstack-0.6.0"


def test_our_guest_reads_a_share_written_before_the_dstack_names(tmp_path: Path) -> None:
    (tmp_path / "app-compose.json").write_bytes(b'{"manifest_version":2}')
    (tmp_path / "sys-config.json").write_text('{"kms_urls":["https://k:1"]}')
    (tmp_path / "user-config").write_text("old")
    shared = read_host_shared(tmp_path)
    assert b"https://k:1" in shared.sys_config and shared.user_config == "old"


def test_the_backend_writes_exactly_the_specs_share(tmp_path: Path) -> None:
    """An update that drops the encrypted env leaves none behind, under either name; files
    the backend adds (a simulated TD's) are kept."""
    cvms = SupervisedCvms(tmp_path, supervisor=None)  # type: ignore[arg-type]  # no process here
    first = build_spec(_rec(encrypted_env=b"sealed", user_config="cfg"), {})
    shared = cvms._write_shared(first)
    (shared / "encrypted-env").write_bytes(b"old name")
    (shared / "dev-td.json").write_text("{}")
    cvms._write_shared(build_spec(_rec(user_config="cfg"), {}))
    assert sorted(p.name for p in shared.iterdir()) == [".instance_info", ".sys-config.json",
                                                        ".user-config", "app-compose.json",
                                                        "dev-td.json"]  # fmt: skip


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", ""])
def test_the_backend_refuses_a_share_name_that_is_not_a_file_name(
    tmp_path: Path, name: str
) -> None:  # fmt: skip
    cvms = SupervisedCvms(tmp_path, supervisor=None)  # type: ignore[arg-type]
    spec = cvm.CvmSpec(vm_id="v1", image="i", vcpu=1, memory_mb=64, shared_files={name: b"x"})
    with pytest.raises(cvm.CvmError, match="must be a plain file name"):
        cvms._write_shared(spec)
    assert not (tmp_path / "escape").exists()
