"""What the VMM puts in a CVM's work dir, from the VM's events (dstack's host-shared files).

dstack names them ``.sys-config.json``, ``.instance_info``, ``.encrypted-env``, ``.user-config``;
the ``CvmBackend`` port only takes plain names, so here they are ``sys-config.json``,
``instance-info.json``, ``encrypted-env`` and ``user-config`` beside ``app-compose.json``.
"""

from __future__ import annotations

import hashlib
import json

from pydstack.adapters.cvm import CvmSpec
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


def build_spec(
    rec: VmRecord,
    composes: dict[str, bytes],
    *,
    app_compose: dict[str, str] | None = None,
    kms_urls: tuple[str, ...] = (),
    gateway_urls: tuple[str, ...] = (),
    gateway_ca: str = "",
) -> CvmSpec:
    vm, res = rec.vm, rec.resources
    compose = compose_of(rec, composes, app_compose)
    # As dstack: the VM's own URLs (CreateVm / UpdateVm kms_urls, gateway_urls) replace the
    # host's; either way the CVM checks whom it reaches (KMS RA-TLS, gateway CA).
    sys_config = {
        "kms_urls": list(rec.kms_urls or kms_urls),
        "gateway_urls": list(rec.gateway_urls or gateway_urls), "pccs_url": "",
        "docker_registry": "", "host_api_url": "",
        "vm_config": json.dumps({"cpu_count": res.vcpu, "memory_size": res.memory_mb << 20,
                                 "image": rec.image}),
    }  # fmt: skip
    if gateway_ca:  # pydstack: the CA the gateways' registration certificates chain to
        sys_config["gateway_ca"] = gateway_ca
    files = {
        "sys-config.json": json.dumps(sys_config).encode(),
        "instance-info.json": json.dumps(instance_info(rec)).encode(),
    }
    if rec.encrypted_env:
        files["encrypted-env"] = rec.encrypted_env
    if rec.user_config:
        files["user-config"] = rec.user_config.encode()
    return CvmSpec(
        vm_id=vm.vm_id, image=rec.image, vcpu=res.vcpu, memory_mb=res.memory_mb,
        disk_gb=res.disk_gb, name=vm.name, cid=vm.cid or None, ports=rec.ports,
        app_compose=compose, shared_files=files,
    )  # fmt: skip
