"""The VMM's HTTP API, shaped like dstack's VMM RPCs: ``POST /prpc/<Method>`` with JSON.

Writes become command events on the log (nothing else changes state); refused requests get
``{"error": ..., "field": ...}`` with a 4xx status and append nothing. ``GET /logs/<id>``
(``?follow=1``) streams the CVM's console. Served, with who may call it, by ``_access``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import version as pkg_version
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from pydstack.adapters.nats import ConflictError
from pydstack.core.events import Event, PortMap, VmUpdateRequested, subject
from pydstack.core.vmm import Refused, VmRecord, decide_command, decide_create, decide_update

from ._actor import Vmm
from ._images import list_backend_images, log_file

VMM = web.AppKey("vmm", Vmm)


class PortIn(msgspec.Struct, forbid_unknown_fields=True):
    host_port: int
    vm_port: int
    protocol: str = "tcp"
    host_address: str = "127.0.0.1"


class VmConfiguration(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    image: str
    compose_file: str = ""
    vcpu: int = 1
    memory: int = 1024  # MB, as dstack
    disk_size: int = 0  # GB
    ports: list[PortIn] = []
    encrypted_env: str = ""  # hex
    app_id: str | None = None
    user_config: str = ""
    stopped: bool = False
    id: str = ""  # pydstack: choose the VM id (default a new UUID)


class UpdateVmRequest(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    compose_file: str = ""
    encrypted_env: str = ""  # hex; empty: keep
    user_config: str | None = None
    update_ports: bool = False
    ports: list[PortIn] = []
    vcpu: int | None = None
    memory: int | None = None
    disk_size: int | None = None
    image: str | None = None


class IdIn(msgspec.Struct, forbid_unknown_fields=True):
    id: str


class StatusRequest(msgspec.Struct, forbid_unknown_fields=True):
    ids: list[str] = []
    brief: bool = False
    keyword: str = ""


def _ports(ports: list[PortIn]) -> tuple[PortMap, ...]:
    return tuple(PortMap(protocol=p.protocol, host_address=p.host_address,
                         host_port=p.host_port, vm_port=p.vm_port) for p in ports)  # fmt: skip


def _hex(value: str, field: str) -> bytes:
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise Refused(field, f"{field} must be hex") from None


def vm_info(rec: VmRecord, *, brief: bool = False) -> dict[str, Any]:
    vm = rec.vm
    info: dict[str, Any] = {
        "id": vm.vm_id, "name": vm.name, "status": vm.state, "desired": vm.desired,
        "app_id": vm.app_id, "host": vm.host, "cid": vm.cid, "boot_progress": vm.boot_stage,
        "boot_error": vm.last_error, "exit_reason": vm.reason, "exit_code": vm.exit_code,
        "starts": vm.starts, "restarts": vm.restarts, "restart_attempts": rec.restart.attempts,
        "restart_exhausted": rec.restart.exhausted, "image_version": rec.image,
        "compose_hash": rec.compose_hash, "uptime_since_ns": rec.restart.started_ns,
    }  # fmt: skip
    if not brief:
        info["configuration"] = {
            "name": vm.name, "image": rec.image, "vcpu": rec.resources.vcpu,
            "memory": rec.resources.memory_mb, "disk_size": rec.resources.disk_gb,
            "ports": [msgspec.to_builtins(p) for p in rec.ports],
            "compose_file": rec.compose.decode(errors="replace"),
            "user_config": rec.user_config,
        }  # fmt: skip
    return info


async def _append(vmm: Vmm, vm_id: str, event: Event, *, new: bool = False) -> None:
    subj = subject("vm", vm_id)
    async with vmm.lock:
        await vmm.view.catch_up(vmm.store)
        try:
            await vmm.store.append(subj, [event], vmm.view.version(subj))
        except ConflictError:
            raise Refused("id", f"vm {vm_id} changed meanwhile; retry", 409) from None


async def create_vm(vmm: Vmm, body: bytes) -> dict[str, Any]:
    req = msgspec.json.decode(body, type=VmConfiguration)
    vm_id = req.id or str(uuid.uuid4())
    compose = req.compose_file.encode()
    if compose:
        try:
            doc = json.loads(compose)
        except ValueError:
            raise Refused("compose_file", "compose_file is not JSON (app-compose.json)") from None
    else:
        doc = {}
    compose_hash = hashlib.sha256(compose).hexdigest()
    app_id = (req.app_id or doc.get("app_id") or compose_hash[:40]).removeprefix("0x")
    async with vmm.lock:
        await vmm.view.catch_up(vmm.store)
        host = vmm.view.hosts.get(vmm.config.host_id)
        if host is None:
            raise Refused("host", "this host has not joined yet", 503)
        images = [i.name for i in list_backend_images(vmm.backend)]
        event = decide_create(
            host, images, vm_id=vm_id, name=req.name, app_id=app_id, vcpu=req.vcpu,
            memory_mb=req.memory, disk_gb=req.disk_size, image=req.image, compose=compose,
            ports=_ports(req.ports), encrypted_env=_hex(req.encrypted_env, "encrypted_env"),
            user_config=req.user_config, existing={v: r.vm for v, r in vmm.view.vms.items()},
        )  # fmt: skip
        try:
            await vmm.store.append(subject("vm", vm_id), [event], 0)
        except ConflictError:
            raise Refused("id", f"vm {vm_id} exists already", 409) from None
    return {"id": vm_id}


async def _command(vmm: Vmm, body: bytes, action: str, force: bool = False) -> dict[str, Any]:
    vm_id = msgspec.json.decode(body, type=IdIn).id
    await vmm.view.catch_up(vmm.store)
    rec = vmm.view.vms.get(vm_id)
    await _append(vmm, vm_id, decide_command(rec.vm if rec else None, vm_id, action, force=force))
    return {}


async def update_vm(vmm: Vmm, body: bytes) -> dict[str, Any]:
    r = msgspec.json.decode(body, type=UpdateVmRequest)
    await vmm.view.catch_up(vmm.store)
    rec = vmm.view.vms.get(r.id)
    compose = r.compose_file.encode()
    if rec is not None and compose:
        named = json.loads(compose).get("app_id") if compose.strip().startswith(b"{") else None
        if named and str(named).removeprefix("0x") != rec.vm.app_id:
            raise Refused(
                "compose_file", f"the app id stays {rec.vm.app_id}; compose names {named}"
            )
    event = VmUpdateRequested(
        vm_id=r.id, compose=compose, user_config=r.user_config,
        encrypted_env=_hex(r.encrypted_env, "encrypted_env") if r.encrypted_env else None,
        ports=_ports(r.ports) if r.update_ports else None, vcpu=r.vcpu or 0,
        memory_mb=r.memory or 0, disk_gb=r.disk_size or 0, image=r.image or "",
    )  # fmt: skip
    images = [i.name for i in list_backend_images(vmm.backend)]
    decide_update(rec.vm if rec else None, vmm.view.hosts.get(vmm.config.host_id), images,
                  event, current_disk_gb=rec.resources.disk_gb if rec else 0)  # fmt: skip
    await _append(vmm, r.id, event)
    return {"id": r.id}


async def status(vmm: Vmm, body: bytes) -> dict[str, Any]:
    req = msgspec.json.decode(body or b"{}", type=StatusRequest)
    await vmm.view.catch_up(vmm.store)
    recs = [r for r in vmm.view.on_host(vmm.config.host_id).values() if r.vm.state != "removed"]
    if req.ids:
        recs = [r for r in recs if r.vm.vm_id in req.ids]
    if req.keyword:
        recs = [r for r in recs if req.keyword in r.vm.name or req.keyword in r.vm.vm_id]
    vms = [vm_info(r, brief=req.brief) for r in sorted(recs, key=lambda r: r.vm.requested_ns)]
    return {"vms": vms, "port_mapping_enabled": True, "total": len(vms)}


async def get_info(vmm: Vmm, body: bytes) -> dict[str, Any]:
    vm_id = msgspec.json.decode(body, type=IdIn).id
    await vmm.view.catch_up(vmm.store)
    rec = vmm.view.vms.get(vm_id)
    if rec is None or rec.vm.state == "removed":
        return {"found": False}
    return {"found": True, "info": vm_info(rec)}


async def get_meta(vmm: Vmm, body: bytes) -> dict[str, Any]:
    c = vmm.config
    return {
        "kms": {"url": c.kms_urls[0] if c.kms_urls else "", "urls": list(c.kms_urls)},
        "gateway": {"url": c.gateway_urls[0] if c.gateway_urls else "",
                    "urls": list(c.gateway_urls)},
        "resources": {"max_cvm_number": c.cid_count, "max_allocable_vcpu": c.vcpu,
                      "max_allocable_memory_in_mb": c.memory_mb},
        "networking": {"supported_modes": ["user"], "default_mode": "user"},
        "backend": vmm.backend.kind, "host_id": c.host_id, "port_range": list(c.port_range),
    }  # fmt: skip


async def compose_hash(vmm: Vmm, body: bytes) -> dict[str, Any]:
    req = msgspec.json.decode(body, type=VmConfiguration)
    return {"hash": hashlib.sha256(req.compose_file.encode()).hexdigest()}


Handler = Callable[[Vmm, bytes], Awaitable[dict[str, Any]]]
METHODS: dict[str, Handler] = {
    "CreateVm": create_vm,
    "StartVm": lambda v, b: _command(v, b, "start"),
    "StopVm": lambda v, b: _command(v, b, "stop", force=True),  # dstack: StopVm kills
    "ShutdownVm": lambda v, b: _command(v, b, "stop"),
    "RemoveVm": lambda v, b: _command(v, b, "remove"),
    "UpdateVm": update_vm,
    "Status": status,
    "GetInfo": get_info,
    "GetMeta": get_meta,
    "GetComposeHash": compose_hash,
}


async def _prpc(request: web.Request) -> web.Response:
    vmm, method = request.app[VMM], request.match_info["method"]
    body = await request.read()
    try:
        if method == "Version":
            return web.json_response({"version": pkg_version("pydstack"), "rev": "pydstack"})
        if method == "ListImages":
            images = list_backend_images(vmm.backend)
            return web.json_response({"images": msgspec.to_builtins(images)})
        handler = METHODS.get(method)
        if handler is None:
            return web.json_response({"error": f"no method {method}"}, status=404)
        return web.json_response(await handler(vmm, body or b"{}"))
    except Refused as exc:
        return web.json_response({"error": str(exc), "field": exc.field}, status=exc.status)
    except msgspec.ValidationError as exc:
        return web.json_response({"error": f"bad request: {exc}"}, status=400)
    except msgspec.DecodeError as exc:
        return web.json_response({"error": f"body is not JSON: {exc}"}, status=400)


async def _logs(request: web.Request) -> web.StreamResponse:
    vmm, vm_id = request.app[VMM], request.match_info["vm_id"]
    if vm_id not in vmm.view.vms:
        return web.json_response({"error": f"no vm {vm_id}", "field": "id"}, status=404)
    path = log_file(vmm.backend, vm_id)
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    follow = request.query.get("follow") in ("1", "true")
    offset = 0
    while True:
        if path is not None and path.exists():
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read()
            offset += len(data)
            if data:
                await resp.write(data)
        if not follow:
            break
        await asyncio.sleep(0.3)
    await resp.write_eof()
    return resp


def make_api(vmm: Vmm, middlewares: Sequence[Middleware] = ()) -> web.Application:
    """The API's routes; who may call them is the caller's middlewares (``_access``)."""
    app = web.Application(middlewares=list(middlewares))
    app[VMM] = vmm
    app.router.add_route("*", "/prpc/{method}", _prpc)
    app.router.add_get("/logs/{vm_id}", _logs)
    return app
