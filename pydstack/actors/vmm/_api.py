"""The VMM's HTTP API, dstack v0.5.11's VMM RPCs: ``POST /prpc/<Method>`` with JSON.

Writes become command events on the log (nothing else changes state); refused requests get
``{"error": ..., "field": ...}`` with a 4xx status and append nothing. Reads (``Status``,
``GetInfo``, ``ListGpus``, ...) and ``ReloadVms`` (a reconcile pass, whose outcomes the actor
appends as usual) append no command. ``GET /logs?id=`` (and ``/logs/<id>``) stream the CVM's
console (``_logs``). Served, with who may call it, by ``_access``. What differs from dstack is
listed in docs/dstack-compat.md.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import uuid
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import version as pkg_version
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from pydstack.adapters.nats import ConflictError
from pydstack.core.apps import unhonoured
from pydstack.core.events import Event, PortMap, VmStopRequested, VmUpdateRequested, subject
from pydstack.core.vmm import (
    Refused,
    check_gpus,
    check_host_options,
    check_networking,
    check_service_urls,
    decide_command,
    decide_create,
    decide_update,
)

from ._actor import Vmm
from ._images import list_backend_images
from ._info import vm_info
from ._logs import logs_path, logs_query
from ._rpc_types import (
    AppIdIn,
    Empty,
    GpuConfigIn,
    IdIn,
    PortIn,
    ResizeVmRequest,
    StatusRequest,
    UpdateVmRequest,
    VmConfiguration,
)

VMM = web.AppKey("vmm", Vmm)

# No backend here passes GPUs through: ListGpus lists none, and CreateVm refuses any asked for.
HOST_GPUS: tuple[str, ...] = ()
MAX_KMS_ANSWER = 64 * 1024


def _ports(ports: list[PortIn]) -> tuple[PortMap, ...]:
    return tuple(PortMap(protocol=p.protocol, host_address=p.host_address,
                         host_port=p.host_port, vm_port=p.vm_port) for p in ports)  # fmt: skip


def _hex(value: str, field: str) -> bytes:
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise Refused(field, f"{field} must be hex") from None


def _gpus(gpus: GpuConfigIn | None) -> None:
    if gpus is not None:
        check_gpus(gpus.attach_mode, [g.slot for g in gpus.gpus], available=HOST_GPUS)


async def _append(vmm: Vmm, vm_id: str, event: Event) -> None:
    subj = subject("vm", vm_id)
    async with vmm.lock:
        await vmm.view.catch_up(vmm.store)
        try:
            await vmm.store.append(subj, [event], vmm.view.version(subj))
        except ConflictError:
            raise Refused("id", f"vm {vm_id} changed meanwhile; retry", 409) from None


def _compose_doc(compose: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(compose)
    except ValueError:
        raise Refused("compose_file", "compose_file is not JSON (app-compose.json)") from None
    if not isinstance(doc, dict):
        raise Refused("compose_file", "compose_file is not a JSON object (app-compose.json)")
    if (found := unhonoured(doc)) is not None:  # refused by name, never silently ignored
        raise Refused("compose_file", f"compose_file.{found[0]}: {found[1]}")
    return doc


async def create_vm(vmm: Vmm, body: bytes) -> dict[str, Any]:
    req = msgspec.json.decode(body, type=VmConfiguration)
    check_host_options(hugepages=req.hugepages, pin_numa=req.pin_numa, no_tee=req.no_tee)
    _gpus(req.gpus)
    check_networking(req.networking.mode if req.networking else "")
    kms_urls = check_service_urls("kms_urls", req.kms_urls)
    gateway_urls = check_service_urls("gateway_urls", req.gateway_urls)
    vm_id = req.id or str(uuid.uuid4())
    compose = req.compose_file.encode()
    doc = _compose_doc(compose) if compose else {}
    compose_hash = hashlib.sha256(compose).hexdigest()
    app_id = (req.app_id or doc.get("app_id") or compose_hash[:40]).removeprefix("0x").lower()
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
        event = msgspec.structs.replace(event, kms_urls=kms_urls, gateway_urls=gateway_urls)
        # `stopped`: created, placed, not started (dstack's VM is loaded, not run); StartVm runs it
        events: list[Event] = [event, *([VmStopRequested(vm_id=vm_id)] if req.stopped else [])]
        try:
            await vmm.store.append(subject("vm", vm_id), events, 0)
        except ConflictError:
            raise Refused("id", f"vm {vm_id} exists already", 409) from None
    return {"id": vm_id}


async def _command(vmm: Vmm, body: bytes, action: str, force: bool = False) -> dict[str, Any]:
    vm_id = msgspec.json.decode(body, type=IdIn).id
    await vmm.view.catch_up(vmm.store)
    rec = vmm.view.vms.get(vm_id)
    await _append(vmm, vm_id, decide_command(rec.vm if rec else None, vm_id, action, force=force))
    return {}


async def _update(vmm: Vmm, event: VmUpdateRequested) -> None:
    await vmm.view.catch_up(vmm.store)
    rec = vmm.view.vms.get(event.vm_id)
    images = [i.name for i in list_backend_images(vmm.backend)]
    decide_update(rec.vm if rec else None, vmm.view.hosts.get(vmm.config.host_id), images,
                  event, current_disk_gb=rec.resources.disk_gb if rec else 0)  # fmt: skip
    await _append(vmm, event.vm_id, event)


async def update_vm(vmm: Vmm, body: bytes) -> dict[str, Any]:
    """dstack's UpdateVm and its older name UpgradeApp (what vmm-cli's update-* send)."""
    r = msgspec.json.decode(body, type=UpdateVmRequest)
    _gpus(r.gpus)
    check_host_options(no_tee=bool(r.no_tee))
    kms_urls = check_service_urls("kms_urls", r.kms_urls) if r.update_kms_urls else None
    gateway_urls = (
        check_service_urls("gateway_urls", r.gateway_urls) if r.update_gateway_urls else None
    )
    await vmm.view.catch_up(vmm.store)
    rec = vmm.view.vms.get(r.id)
    compose = r.compose_file.encode()
    if compose:
        named = _compose_doc(compose).get("app_id")
        if rec is not None and named and str(named).removeprefix("0x") != rec.vm.app_id:
            raise Refused(
                "compose_file", f"the app id stays {rec.vm.app_id}; compose names {named}"
            )
    event = VmUpdateRequested(
        vm_id=r.id, compose=compose, user_config=r.user_config,
        encrypted_env=_hex(r.encrypted_env, "encrypted_env") if r.encrypted_env else None,
        ports=_ports(r.ports) if r.update_ports else None, vcpu=r.vcpu or 0,
        memory_mb=r.memory or 0, disk_gb=r.disk_size or 0, image=r.image or "",
        kms_urls=kms_urls, gateway_urls=gateway_urls,
    )  # fmt: skip
    await _update(vmm, event)
    return {"id": r.id}


async def resize_vm(vmm: Vmm, body: bytes) -> dict[str, Any]:
    """dstack's ResizeVm: vcpu, memory, disk (grows only), image; taken at the next start."""
    r = msgspec.json.decode(body, type=ResizeVmRequest)
    if (r.vcpu, r.memory, r.disk_size, r.image) == (None, None, None, None):
        raise Refused("vcpu", "ResizeVm: give vcpu, memory, disk_size or image")
    for field, value in (("vcpu", r.vcpu), ("memory", r.memory), ("disk_size", r.disk_size)):
        if value == 0:
            raise Refused(field, f"{field} must be > 0 (leave it out to keep it)")
    if r.image == "":
        raise Refused("image", "image must not be empty (leave it out to keep it)")
    event = VmUpdateRequested(vm_id=r.id, vcpu=r.vcpu or 0, memory_mb=r.memory or 0,
                              disk_gb=r.disk_size or 0, image=r.image or "")  # fmt: skip
    await _update(vmm, event)
    return {}


async def status(vmm: Vmm, body: bytes) -> dict[str, Any]:
    req = msgspec.json.decode(body, type=StatusRequest)
    await vmm.view.catch_up(vmm.store)
    recs = [r for r in vmm.view.on_host(vmm.config.host_id).values() if r.vm.state != "removed"]
    if req.ids:
        recs = [r for r in recs if r.vm.vm_id in req.ids]
    if req.keyword:
        k = req.keyword
        recs = [r for r in recs if any(k in s for s in (r.vm.name, r.vm.vm_id, r.vm.app_id,
                                                         r.image))]  # fmt: skip
    recs.sort(key=lambda r: r.vm.requested_ns)
    total = len(recs)
    if req.page and req.page_size:  # 1-based, as dstack
        recs = recs[(req.page - 1) * req.page_size : req.page * req.page_size]
    vms = [vm_info(r, brief=req.brief) for r in recs]
    return {"vms": vms, "port_mapping_enabled": True, "total": total}


async def get_info(vmm: Vmm, body: bytes) -> dict[str, Any]:
    vm_id = msgspec.json.decode(body, type=IdIn).id
    await vmm.view.catch_up(vmm.store)
    rec = vmm.view.vms.get(vm_id)
    if rec is None or rec.vm.state == "removed":
        return {"found": False}
    return {"found": True, "info": vm_info(rec)}


async def get_meta(vmm: Vmm, body: bytes) -> dict[str, Any]:
    msgspec.json.decode(body, type=Empty)
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


async def list_gpus(vmm: Vmm, body: bytes) -> dict[str, Any]:
    msgspec.json.decode(body, type=Empty)
    return {"gpus": [], "allow_attach_all": False}


def _relay_tls() -> ssl.SSLContext:
    # The VMM is the host: whatever it relays is as trusted as the host, i.e. not at all. What
    # makes the key usable is the KMS root's signature over (app id, timestamp, key) in the
    # answer, which the caller checks (vmm-cli against its KMS whitelist, pydstack's CLI and
    # dashboard against the cluster root on the log). So the relay pins nothing.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def env_pubkey(vmm: Vmm, body: bytes) -> dict[str, Any]:
    """dstack's GetAppEnvEncryptPubKey: the host's first KMS's answer, relayed as is."""
    aid = _hex(msgspec.json.decode(body, type=AppIdIn).app_id, "app_id")
    if len(aid) != 20:
        raise Refused("app_id", f"app_id must be 20 bytes (40 hex digits), got {len(aid)}")
    if not vmm.config.kms_urls:
        raise Refused("kms_urls", "this host has no KMS (up without a KMS or --kms-url)", 503)
    url = vmm.config.kms_urls[0].rstrip("/")
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s,
            s.post(
                f"{url}/prpc/GetAppEnvEncryptPubKey?json",
                json={"app_id": aid.hex()},
                ssl=_relay_tls(),
            ) as r,  # fmt: skip
        ):
            raw = await r.content.read(MAX_KMS_ANSWER)
            answer = json.loads(raw)
            if r.status != 200 or not isinstance(answer, dict):
                raise Refused("kms", f"KMS {url} answered {r.status}: {str(answer)[:200]}", 502)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        raise Refused("kms", f"KMS {url}: {type(exc).__name__}: {exc}", 502) from None
    keys = ("public_key", "signature", "timestamp", "signature_v1")
    return {k: answer[k] for k in keys if k in answer}


async def reload_vms(vmm: Vmm, body: bytes) -> dict[str, Any]:
    """dstack re-reads its VM directory; here the log is the state: read it again and
    reconcile now (the outcomes are the actor's usual events)."""
    msgspec.json.decode(body, type=Empty)
    ran = len(vmm.actions)
    await vmm.pass_once()
    acts = vmm.actions[ran:]
    on_host = vmm.view.on_host(vmm.config.host_id).values()
    removed = sum(1 for a in acts if type(a).__name__ == "Remove")
    loaded = sum(1 for r in on_host if r.vm.state != "removed")
    return {"loaded": loaded, "updated": len(acts) - removed, "removed": removed}


Handler = Callable[[Vmm, bytes], Awaitable[dict[str, Any]]]
METHODS: dict[str, Handler] = {
    "CreateVm": create_vm,
    "StartVm": lambda v, b: _command(v, b, "start"),
    "StopVm": lambda v, b: _command(v, b, "stop", force=True),  # dstack: StopVm kills
    "ShutdownVm": lambda v, b: _command(v, b, "stop"),
    "RemoveVm": lambda v, b: _command(v, b, "remove"),
    "UpdateVm": update_vm,
    "UpgradeApp": update_vm,  # dstack: "Deprecated, use UpdateVm"; its vmm-cli still sends it
    "ResizeVm": resize_vm,
    "Status": status,
    "GetInfo": get_info,
    "GetMeta": get_meta,
    "GetComposeHash": compose_hash,
    "ListGpus": list_gpus,
    "GetAppEnvEncryptPubKey": env_pubkey,
    "ReloadVms": reload_vms,
}


def _field(exc: msgspec.ValidationError) -> str:
    """The field a msgspec error names: the top of its path (``... - at `$.gpus.attach_mode```:
    ``gpus``), else the unknown field at the top (``unknown field `hugepage```)."""
    text = str(exc)
    if m := re.search(r"at `\$\.([A-Za-z0-9_]+)", text):
        return m.group(1)
    m = re.search(r"unknown field `([^`]{0,64})`", text)
    return m.group(1) if m else ""


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
        field = _field(exc)
        return web.json_response({"error": f"bad request: {exc}", "field": field}, status=400)
    except msgspec.DecodeError as exc:
        return web.json_response({"error": f"body is not JSON: {exc}"}, status=400)


async def _logs_query(request: web.Request) -> web.StreamResponse:
    return await logs_query(request, request.app[VMM])


async def _logs_path(request: web.Request) -> web.StreamResponse:
    return await logs_path(request, request.app[VMM])


def make_api(vmm: Vmm, middlewares: Sequence[Middleware] = ()) -> web.Application:
    """The API's routes; who may call them is the caller's middlewares (``_access``)."""
    app = web.Application(middlewares=list(middlewares))
    app[VMM] = vmm
    app.router.add_route("*", "/prpc/{method}", _prpc)
    app.router.add_get("/logs", _logs_query)
    app.router.add_get("/logs/{vm_id}", _logs_path)
    return app
