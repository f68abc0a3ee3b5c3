"""What the VMM puts in a CVM's work dir, from the VM's events: dstack v0.5.11's host-shared
files, by its names and in its shapes (vmm ``prepare_work_dir`` / ``make_sys_config``), so a
dstack guest reads our share and our guest a dstack VMM's:

- ``app-compose.json``: the bytes as deployed;
- ``.sys-config.json``: ``kms_urls``, ``gateway_urls``, ``pccs_url`` / ``docker_registry`` /
  ``host_api_url`` (null when unset), ``vm_config`` (a JSON string: dstack's ``VmConfig`` fields
  and ``spec_version`` 1), plus pydstack's ``gateway_ca`` (dstack's guest ignores it);
- ``.instance_info``: ``instance_id_seed``, ``instance_id``, ``app_id`` (hex). dstack's VMM
  writes only ``app_id`` and keeps what its guest reports back; ours writes a seed derived from
  the VM id, so a re-created VM keeps its instance. The guest derives the id from the seed
  and ignores the written one (the host chooses only the seed);
- ``.encrypted-env`` (raw bytes) and ``.user-config`` (text), when given.
"""

from __future__ import annotations

import hashlib
import json

from pydstack.adapters.cvm import (
    ENCRYPTED_ENV,
    INSTANCE_INFO,
    SYS_CONFIG,
    USER_CONFIG,
    CvmSpec,
)
from pydstack.core.vmm import VmRecord


class ComposeMissing(LookupError):
    pass


def compose_of(
    rec: VmRecord, composes: dict[str, bytes], app_compose: dict[str, str] | None = None
) -> bytes:
    """The VM's own compose, else the app's compose with its hash, else the app's latest."""
    if rec.compose:
        return rec.compose
    wanted = rec.compose_hash or (app_compose or {}).get(rec.vm.app_id, "")
    if not wanted:
        return json.dumps({"name": rec.vm.name, "manifest_version": 2}).encode()
    try:
        return composes[wanted]
    except KeyError:
        raise ComposeMissing(
            f"no app-compose with hash {rec.compose_hash[:16]}… on the log (register the app)"
        ) from None


def instance_info(rec: VmRecord) -> dict[str, str]:
    """Stable across re-creates: the seed is derived from the VM id, as the id is unique."""
    seed = hashlib.sha256(f"pydstack instance seed {rec.vm.vm_id}".encode()).digest()[:20]
    app_id = rec.vm.app_id.removeprefix("0x")
    try:
        app = bytes.fromhex(app_id)
    except ValueError:
        app = hashlib.sha256(app_id.encode()).digest()[:20]
    instance_id = hashlib.sha256(seed + app).digest()[:20]
    return {"instance_id_seed": seed.hex(), "instance_id": instance_id.hex(), "app_id": app.hex()}


def vm_config(rec: VmRecord) -> dict[str, object]:
    """dstack's ``VmConfig`` as its VMM serializes it (field order, ``spec_version`` last);
    ``os_image_hash`` empty: the guest names its own, the KMS checks it against the log."""
    res = rec.resources
    return {
        "os_image_hash": "", "cpu_count": res.vcpu, "memory_size": res.memory_mb << 20,
        "pci_hole64_size": 0, "hugepages": False, "num_gpus": 0, "num_nvswitches": 0,
        "hotplug_off": False, "image": rec.image, "host_share_mode": "", "spec_version": 1,
    }  # fmt: skip


def build_spec(
    rec: VmRecord,
    composes: dict[str, bytes],
    *,
    app_compose: dict[str, str] | None = None,
    kms_urls: tuple[str, ...] = (),
    gateway_urls: tuple[str, ...] = (),
    gateway_ca: str = "",
    docker_registry: str = "",
) -> CvmSpec:
    vm, res = rec.vm, rec.resources
    compose = compose_of(rec, composes, app_compose)
    # As dstack: the VM's own URLs (CreateVm / UpdateVm kms_urls, gateway_urls) replace the
    # host's; either way the CVM checks whom it reaches (KMS RA-TLS, gateway CA).
    sys_config: dict[str, object] = {
        "kms_urls": list(rec.kms_urls or kms_urls),
        "gateway_urls": list(rec.gateway_urls or gateway_urls),
        "pccs_url": None, "docker_registry": docker_registry or None, "host_api_url": None,
        "vm_config": json.dumps(vm_config(rec), separators=(",", ":")),
    }  # fmt: skip
    if gateway_ca:  # pydstack: the CA the gateways' registration certificates chain to
        sys_config["gateway_ca"] = gateway_ca
    files = {
        SYS_CONFIG: json.dumps(sys_config, separators=(",", ":")).encode(),
        INSTANCE_INFO: json.dumps(instance_info(rec), separators=(",", ":")).encode(),
    }
    if rec.encrypted_env:
        files[ENCRYPTED_ENV] = rec.encrypted_env
    if rec.user_config:
        files[USER_CONFIG] = rec.user_config.encode()
    return CvmSpec(
        vm_id=vm.vm_id, image=rec.image, vcpu=res.vcpu, memory_mb=res.memory_mb,
        disk_gb=res.disk_gb, name=vm.name, cid=vm.cid or None, ports=rec.ports,
        app_compose=compose, shared_files=files,
    )  # fmt: skip
