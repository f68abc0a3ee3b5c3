"""Operator input about apps: request bodies, the app-compose, and command decisions. Pure.

Bodies are msgspec Structs that reject unknown fields, so a typo is a 400 naming the field.
``build_app_compose`` writes the bytes dstack v0.5.11's ``vmm-cli.py compose`` writes for the
same options (its fields in its order, ``json.dumps(indent=4, ensure_ascii=False)``, UTF-8,
``allowed_envs`` from the env names; golden vectors in tests/vectors/dstack/app-compose), whose
sha256 is the compose hash and whose first 20 bytes are the app id. ``compose_ids`` refuses, by
name, a field the guest cannot honour (``_fields.unhonoured``). Usage::

    text = build_app_compose(ComposeRequest(name="web", compose=yaml, env_names=["TOKEN"]))
    plan = plan_deploy(DeployRequest(app_compose=text, encrypted_env=hex_blob, ports=["8080:80"]),
                       vm_id="…")
    decide_vm_command(vm, "stop")          # VmStopRequested, or a CommandRefused
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Final, Literal, TypeVar

import msgspec

from pydstack.core.events import (
    PortMap,
    SubjectError,
    VmRemoveRequested,
    VmRequested,
    VmResources,
    VmStartRequested,
    VmStopRequested,
    subject,
)
from pydstack.core.portmap import PortMapError, parse_port_map
from pydstack.core.projections import Vm
from pydstack.core.vmm.image_name import image_name_error

from ._fields import key_provider_kind, unhonoured

ENV_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MIN_SEALED_ENV: Final = 32 + 12 + 16  # ephemeral public key, IV, GCM tag
Action = Literal["start", "stop", "remove"]
T = TypeVar("T")
ACTIONS: Final = ("start", "stop", "remove")


class BadInput(ValueError):
    """Operator input that cannot be used; the message starts with the field it is about."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class CommandRefused(ValueError):
    """A command the VM's current state does not allow (HTTP 409, or 404 for a missing VM)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


class ComposeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """vmm-cli ``compose``'s options; the defaults are its ``--kms --gateway --public-logs
    --public-sysinfo`` (vmm-cli's own defaults are all off)."""

    name: str
    compose: str  # docker-compose.yaml text, or a whole app-compose.json (used byte for byte)
    env_names: tuple[str, ...] = ()
    kms_enabled: bool = True
    gateway_enabled: bool = True
    local_key_provider_enabled: bool = False
    key_provider: str = ""  # "" (from the flags above), "none", "kms" or "local"
    key_provider_id: str = ""  # hex: the KMS root CA's SPKI DER the app pins
    public_logs: bool = True
    public_sysinfo: bool = True
    no_instance_id: bool = False
    secure_time: bool = False
    pre_launch_script: str | None = None  # None: no field ("" is written, as vmm-cli does)
    swap_size: int = 0  # bytes; 0: no field
    storage_fs: str = ""  # pydstack's option (vmm-cli has none): written last when given


class DeployRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    app_compose: str  # the exact app-compose.json text; its sha256 is the compose hash
    compose_hash: str = ""  # what the browser showed; must match when given
    name: str = ""  # VM name [default: the app-compose's name]
    encrypted_env: str = ""  # hex: ephemeral_pub(32) || iv(12) || AES-GCM ciphertext
    env_names: tuple[str, ...] = ()  # the names sealed inside (checked against allowed_envs)
    ports: tuple[str, ...] = ()  # "[tcp|udp:][ADDR:]HOST_PORT:VM_PORT"
    vcpu: int = 1
    memory_mb: int = 2048
    disk_gb: int = 20
    image: str = ""
    host: str = ""
    vm_id: str = ""


class CommandRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    force: bool = False  # stop only: like dstack's `stop --force`


def decode_body(data: bytes, kind: type[T]) -> T:
    """Decode a JSON body; errors name the field (``vcpu: Expected `int`, got `str```)."""
    try:
        return msgspec.json.decode(data or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        where = re.search(r" - at `\$\.?([^`]*)`$", text)
        field = (where.group(1) if where else "") or "body"
        raise BadInput(field, text.split(" - at ")[0]) from None
    except msgspec.DecodeError as exc:
        raise BadInput("body", f"not JSON: {exc}") from None


def _env_names(names: tuple[str, ...], field: str) -> list[str]:
    seen: list[str] = []
    for n in names:
        if not ENV_NAME.match(n):
            raise BadInput(field, f"{n!r} is not an env var name (letters, digits, '_')")
        if n not in seen:
            seen.append(n)
    return seen


def as_app_compose(text: str) -> dict[str, Any] | None:
    """The app-compose object if ``text`` is one (JSON with ``manifest_version``), else None."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and "manifest_version" in doc else None


def build_app_compose(req: ComposeRequest) -> str:
    """dstack's app-compose.json for a docker-compose file (or ``req.compose`` as is, when it
    already is an app-compose)."""
    if as_app_compose(req.compose) is not None:
        return req.compose
    if req.swap_size < 0:
        raise BadInput("swap_size", f"{req.swap_size} is negative")
    if not req.name.strip():
        raise BadInput("name", "empty; name the app")
    if not req.compose.strip():
        raise BadInput("compose", "empty; paste a docker-compose.yaml or an app-compose.json")
    doc: dict[str, Any] = {
        "manifest_version": 2,
        "name": req.name.strip(),
        "runner": "docker-compose",
        "docker_compose_file": req.compose,
        "kms_enabled": req.kms_enabled,
        "gateway_enabled": req.gateway_enabled,
        "local_key_provider_enabled": req.local_key_provider_enabled,
        "key_provider_id": req.key_provider_id,
        "public_logs": req.public_logs,
        "public_sysinfo": req.public_sysinfo,
        "allowed_envs": _env_names(req.env_names, "env_names"),
        "no_instance_id": req.no_instance_id,
        "secure_time": req.secure_time,
    }
    if req.key_provider:
        doc["key_provider"] = req.key_provider
    if req.pre_launch_script is not None:
        doc["pre_launch_script"] = req.pre_launch_script
    if req.swap_size:
        doc["swap_size"] = req.swap_size
    if req.storage_fs:
        doc["storage_fs"] = req.storage_fs
    return json.dumps(doc, indent=4, ensure_ascii=False)


def refuse_unhonoured(doc: dict[str, Any], field: str = "app_compose") -> None:
    """BadInput naming the first app-compose field the guest cannot honour (``_fields``)."""
    found = unhonoured(doc)
    if found is not None:
        raise BadInput(f"{field}.{found[0]}", found[1])


def compose_ids(text: str) -> tuple[str, str, dict[str, Any]]:
    """``(app_id, compose_hash, compose)`` as dstack derives them from the exact (UTF-8)
    bytes; BadInput naming a field the guest cannot honour."""
    doc = as_app_compose(text)
    if doc is None:
        raise BadInput(
            "app_compose", "not an app-compose.json (a JSON object with manifest_version)"
        )
    refuse_unhonoured(doc)
    compose_hash = hashlib.sha256(text.encode()).hexdigest()
    named = doc.get("app_id")
    app_id = str(named).lower().removeprefix("0x") if named else compose_hash[:40]
    return app_id, compose_hash, doc


def parse_port(value: str, field: str = "ports") -> PortMap:
    """``[tcp|udp:][ADDR:]HOST_PORT:VM_PORT`` (as ``pydstack vm request --port``); ADDR an IP
    literal (``[...]`` for IPv6)."""
    try:
        return parse_port_map(value)
    except PortMapError as exc:
        raise BadInput(field, str(exc)) from None


def _subject(kind: str, ident: str, field: str) -> str:
    try:
        return subject(kind, ident)
    except SubjectError as exc:
        raise BadInput(field, str(exc)) from None


class DeployPlan(msgspec.Struct, frozen=True, kw_only=True):
    app_id: str
    compose_hash: str
    app_name: str
    compose: bytes
    request: VmRequested


def plan_deploy(req: DeployRequest, *, vm_id: str) -> DeployPlan:
    """Check a deploy and build its VmRequested (the app's event depends on the log)."""
    app_id, compose_hash, doc = compose_ids(req.app_compose)
    _subject("app", app_id, "app_compose")
    if req.compose_hash and req.compose_hash.lower() != compose_hash:
        raise BadInput("compose_hash", f"{req.compose_hash} is not the sha256 of app_compose "
                                       f"({compose_hash})")  # fmt: skip
    vm_id = req.vm_id or vm_id
    _subject("vm", vm_id, "vm_id")
    if req.host:
        _subject("host", req.host, "host")
    for field, value, lo, hi in (("vcpu", req.vcpu, 1, 1024),
                                 ("memory_mb", req.memory_mb, 64, 16 * 1024 * 1024),
                                 ("disk_gb", req.disk_gb, 1, 65536)):  # fmt: skip
        if not lo <= value <= hi:
            raise BadInput(field, f"{value} is out of range {lo}..{hi}")
    try:
        sealed = bytes.fromhex(req.encrypted_env.removeprefix("0x"))
    except ValueError:
        raise BadInput("encrypted_env", "not hex") from None
    if sealed and len(sealed) < MIN_SEALED_ENV:
        raise BadInput("encrypted_env", f"{len(sealed)} bytes is too short for "
                                        "ephemeral key + IV + GCM tag")  # fmt: skip
    names = _env_names(req.env_names, "env_names")
    allowed = doc.get("allowed_envs") or []
    if sealed and not allowed:
        raise BadInput("encrypted_env", "the app-compose allows no env vars (allowed_envs is "
                                        "empty): the guest would drop them all")  # fmt: skip
    if sealed and (kind := key_provider_kind(doc)) in ("local", "none"):
        raise BadInput("encrypted_env", f"the app-compose's key provider is {kind}: the guest "
                                        "would not have the KMS key sealing it")  # fmt: skip
    missing = [n for n in names if n not in allowed]
    if missing:
        raise BadInput("env_names", f"{', '.join(missing)} not in the app-compose's "
                                    "allowed_envs")  # fmt: skip
    if req.image and (reason := image_name_error(req.image, "")) is not None:
        raise BadInput("image", reason)  # "" is the host's only image (the VMM picks it)
    ports = tuple(parse_port(p) for p in req.ports)
    if len({(p.protocol, p.host_port) for p in ports}) != len(ports):
        raise BadInput("ports", "a host port is mapped twice")
    app_name = str(doc.get("name", ""))
    vm = VmRequested(
        vm_id=vm_id, app_id=app_id, name=req.name or app_name or app_id, image=req.image,
        compose_hash=compose_hash, ports=ports, encrypted_env=sealed, host=req.host,
        resources=VmResources(vcpu=req.vcpu, memory_mb=req.memory_mb, disk_gb=req.disk_gb),
    )  # fmt: skip
    return DeployPlan(app_id=app_id, compose_hash=compose_hash, app_name=app_name,
                      compose=req.app_compose.encode(), request=vm)  # fmt: skip


VmCommand = VmStartRequested | VmStopRequested | VmRemoveRequested


def decide_vm_command(vm: Vm | None, vm_id: str, action: str, *, force: bool = False) -> VmCommand:
    """The command event for a button, or CommandRefused when it would mean nothing."""
    if action not in ACTIONS:
        raise CommandRefused(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}",
                             404)  # fmt: skip
    if vm is None:
        raise CommandRefused(f"no vm {vm_id}", 404)
    if vm.state == "removed" or vm.desired == "removed":
        raise CommandRefused(f"vm {vm_id} is removed" if vm.state == "removed"
                             else f"vm {vm_id} is being removed")  # fmt: skip
    if action == "start":
        if vm.desired == "running" and vm.state not in ("exited", "stopped", "rejected"):
            raise CommandRefused(f"vm {vm_id} is already meant to run (state {vm.state})")
        return VmStartRequested(vm_id=vm_id)
    if action == "stop":
        if vm.desired == "stopped" and not force:
            raise CommandRefused(f"vm {vm_id} is already stopping or stopped (state {vm.state})")
        return VmStopRequested(vm_id=vm_id, force=force)
    return VmRemoveRequested(vm_id=vm_id)
