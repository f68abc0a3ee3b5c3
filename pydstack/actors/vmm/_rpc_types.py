"""The VMM API's request bodies: dstack v0.5.11's ``vmm_rpc.proto`` messages as JSON.

Every field of dstack's messages is accepted (``u32`` fields as ints in 0..2^32-1, ``bytes`` as
hex); a field dstack does not have is refused by name, so a typo is not silently dropped. What
each field does here is decided in ``_api`` with ``pydstack.core.vmm.options``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]


class PortIn(msgspec.Struct, forbid_unknown_fields=True):
    host_port: U32
    vm_port: U32
    protocol: str = "tcp"
    host_address: str = "127.0.0.1"


class GpuSpecIn(msgspec.Struct, forbid_unknown_fields=True):
    slot: str = ""


class GpuConfigIn(msgspec.Struct, forbid_unknown_fields=True):
    gpus: list[GpuSpecIn] = []
    attach_mode: str = ""


class NetworkingIn(msgspec.Struct, forbid_unknown_fields=True):
    mode: str = ""


class VmConfiguration(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    image: str
    compose_file: str = ""
    vcpu: U32 = 1
    memory: U32 = 1024  # MB, as dstack
    disk_size: U32 = 0  # GB
    ports: list[PortIn] = []
    encrypted_env: str = ""  # hex
    app_id: str | None = None
    user_config: str = ""
    hugepages: bool = False
    pin_numa: bool = False
    gpus: GpuConfigIn | None = None
    kms_urls: list[str] = []
    gateway_urls: list[str] = []
    stopped: bool = False
    no_tee: bool = False
    networking: NetworkingIn | None = None
    # Not in dstack's message, yet its vmm-cli sends it (`deploy --swap`) and dstack drops it;
    # the swap a CVM gets is the app-compose's `swap_size`, here as there.
    swap_size: int = 0
    id: str = ""  # pydstack: choose the VM id (default a new UUID)


class UpdateVmRequest(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    compose_file: str = ""
    encrypted_env: str = ""  # hex; empty: keep
    user_config: str | None = None
    update_ports: bool = False
    ports: list[PortIn] = []
    update_kms_urls: bool = False
    kms_urls: list[str] = []
    update_gateway_urls: bool = False
    gateway_urls: list[str] = []
    gpus: GpuConfigIn | None = None
    vcpu: U32 | None = None
    memory: U32 | None = None
    disk_size: U32 | None = None
    image: str | None = None
    no_tee: bool | None = None


class ResizeVmRequest(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    vcpu: U32 | None = None
    memory: U32 | None = None
    disk_size: U32 | None = None
    image: str | None = None


class IdIn(msgspec.Struct, forbid_unknown_fields=True):
    id: str


class AppIdIn(msgspec.Struct, forbid_unknown_fields=True):
    app_id: str  # hex, 20 bytes


class StatusRequest(msgspec.Struct, forbid_unknown_fields=True):
    ids: list[str] = []
    brief: bool = False
    keyword: str = ""
    page: U32 = 0  # 1-based; 0 (or page_size 0): everything, as dstack
    page_size: U32 = 0


class Empty(msgspec.Struct, forbid_unknown_fields=True):
    pass
