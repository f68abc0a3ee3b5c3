"""dstack v0.5.11's VMM RPCs as its ``vmm-cli.py`` sends them (bodies copied from its
``create_vm``, ``update_vm*``, ``resize_vm``, ``show_logs``), over the unix socket with a client
built like its own (``tests.vmmapi``); each call is on the log as a command event."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pydstack.actors.vmm import Vmm, running_vmm
from pydstack.actors.vmm._images import log_file
from pydstack.adapters.nats import EventStore
from pydstack.core.events import (
    VmRequested,
    VmStopRequested,
    VmUpdated,
    VmUpdateRequested,
)
from tests import vmmapi

from .conftest import VmmHost, compose, events_of, wait_until

KMS_A = "https://kms-a.example:9201"
GW_A = "https://gw-a.example:9202"


def deploy_body(name: str, **kw: Any) -> dict[str, Any]:
    """What vmm-cli.py deploy sends (--stopped, --kms-url, --gateway-url, --net user, --port,
    --swap), with every VmConfiguration field it always sets."""
    return {
        "name": name, "image": "sandbox-busybox", "compose_file": compose(name), "vcpu": 1,
        "memory": 256, "disk_size": 1, "app_id": None, "user_config": "",
        "ports": [{"protocol": "tcp", "host_address": "127.0.0.1", "host_port": 21900,
                   "vm_port": 8080}],
        "hugepages": False, "pin_numa": False, "stopped": True, "no_tee": False,
        "swap_size": 64 << 20, "kms_urls": [KMS_A], "gateway_urls": [GW_A],
        "networking": {"mode": "user"}, **kw,
    }  # fmt: skip


@pytest.fixture
async def api(vmm_host: VmmHost) -> AsyncIterator[tuple[Vmm, str]]:
    async with running_vmm(vmm_host.store, vmm_host.launch()) as (vmm, ends):
        yield vmm, ends.url


async def call(url: str, rpc: str, body: dict[str, Any] | None = None) -> Any:
    return await asyncio.to_thread(vmmapi.call, url, rpc, body)


async def created_stopped(url: str, name: str, **kw: Any) -> str:
    vm_id: str = (await call(url, "CreateVm", deploy_body(name, **kw)))["id"]

    async def stopped() -> bool:
        info = (await call(url, "GetInfo", {"id": vm_id}))["info"]
        return bool(info["status"] == "stopped")

    await wait_until(stopped, 30, f"{vm_id} stopped")
    return vm_id


async def test_create_vm_takes_every_field_of_vmm_cli_deploy(
    api: tuple[Vmm, str], store: EventStore
) -> None:
    """dstack's VmConfiguration as vmm-cli deploy fills it: accepted, the VM stays stopped,
    its own KMS / gateway URLs are on the log and in GetInfo's configuration."""
    _, url = api
    none = {"attach_mode": "listed", "gpus": []}
    env = "0xab" + "cd" * 40
    vm_id = await created_stopped(url, "full", gpus=none, user_config='{"u": 1}', encrypted_env=env)
    events = await events_of(store, vm_id)
    req = next(e for e in events if isinstance(e, VmRequested))
    assert (req.kms_urls, req.gateway_urls) == ((KMS_A,), (GW_A,))
    assert any(isinstance(e, VmStopRequested) for e in events)
    cfg = (await call(url, "GetInfo", {"id": vm_id}))["info"]["configuration"]
    assert cfg["kms_urls"] == [KMS_A] and cfg["gateway_urls"] == [GW_A]
    assert cfg["stopped"] is True and cfg["disk_size"] == 1 and cfg["ports"][0]["host_port"]
    assert (cfg["hugepages"], cfg["pin_numa"], cfg["no_tee"]) == (False, False, False)
    assert cfg["user_config"] == '{"u": 1}' and cfg["encrypted_env"] == "ab" + "cd" * 40
    assert req.app_id == cfg["app_id"] == hashlib.sha256(compose("full").encode()).hexdigest()[:40]
    info = (await call(url, "GetInfo", {"id": vm_id}))["info"]
    assert info["exited_at"].endswith("s") and info["events"] == []
    listed = (await call(url, "Status", {}))["vms"]
    assert [v["id"] for v in listed] == [vm_id] and listed[0]["uptime"] == ""


async def test_upgrade_app_does_what_update_vm_does(
    api: tuple[Vmm, str], store: EventStore
) -> None:
    """vmm-cli's update-user-config / update-ports / update --kms-url bodies (UpgradeApp):
    each a VmUpdateRequested the VMM accepts (VmUpdated); the VM's URLs change."""
    _, url = api
    vm_id = await created_stopped(url, "upg")
    await call(url, "UpgradeApp", {"id": vm_id, "user_config": '{"a": 1}'})
    ports = [{"protocol": "tcp", "host_address": "127.0.0.1", "host_port": 21901, "vm_port": 80}]
    await call(url, "UpgradeApp", {"id": vm_id, "update_ports": True, "ports": ports})
    await call(url, "UpdateVm", {"id": vm_id, "update_kms_urls": True, "kms_urls": [],
                                 "update_gateway_urls": True,
                                 "gateway_urls": ["https://gw-b.example:1"],
                                 "gpus": {"attach_mode": "listed", "gpus": []},
                                 "no_tee": False})  # fmt: skip

    async def applied() -> dict[str, Any] | None:
        cfg: dict[str, Any] = (await call(url, "GetInfo", {"id": vm_id}))["info"]["configuration"]
        return cfg if cfg["gateway_urls"] == ["https://gw-b.example:1"] else None

    cfg = await wait_until(applied, 20, "update applied")
    assert cfg["user_config"] == '{"a": 1}' and cfg["ports"][0]["host_port"] == 21901
    assert cfg["kms_urls"] == []
    events = await events_of(store, vm_id)
    assert sum(isinstance(e, VmUpdateRequested) for e in events) == 3
    assert sum(isinstance(e, VmUpdated) for e in events) == 3


async def test_resize_vm_changes_vcpu_memory_and_disk_as_vmm_cli_resize_sends(
    api: tuple[Vmm, str], store: EventStore
) -> None:
    _, url = api
    vm_id = await created_stopped(url, "rsz")
    assert await call(url, "ResizeVm", {"id": vm_id, "vcpu": 2, "memory": 512,
                                        "disk_size": 3}) == {}  # fmt: skip

    async def resized() -> bool:
        cfg = (await call(url, "GetInfo", {"id": vm_id}))["info"]["configuration"]
        return bool((cfg["vcpu"], cfg["memory"], cfg["disk_size"]) == (2, 512, 3))

    await wait_until(resized, 20, "resized")
    req = [e for e in await events_of(store, vm_id) if isinstance(e, VmUpdateRequested)]
    assert [(e.vcpu, e.memory_mb, e.disk_gb) for e in req] == [(2, 512, 3)]


async def test_read_rpcs_answer_in_dstacks_shape(api: tuple[Vmm, str]) -> None:
    """ListGpus, ReloadVms, GetMeta, Status paging, ListImages, Version, GetComposeHash: the
    keys vmm-cli reads (lsgpu, lsvm, lsimage)."""
    _, url = api
    assert await call(url, "ListGpus") == {"gpus": [], "allow_attach_all": False}
    await created_stopped(url, "rld")
    assert await call(url, "ReloadVms") == {"loaded": 1, "updated": 0, "removed": 0}
    meta = await call(url, "GetMeta")
    assert set(meta) >= {"kms", "gateway", "resources"}
    assert set(meta["resources"]) == {"max_cvm_number", "max_allocable_vcpu",
                                      "max_allocable_memory_in_mb"}  # fmt: skip
    paged = await call(url, "Status", {"page": 2, "page_size": 1, "brief": True})
    assert paged["total"] == 1 and paged["vms"] == []
    first = await call(url, "Status", {"page": 1, "page_size": 1, "keyword": "rld"})
    assert [v["name"] for v in first["vms"]] == ["rld"] and "configuration" in first["vms"][0]
    images = (await call(url, "ListImages"))["images"]
    assert {"name", "description", "version", "is_dev"} <= set(images[0])
    assert set(await call(url, "Version")) == {"version", "rev"}
    body = compose("h")
    got = await call(url, "GetComposeHash", {"name": "h", "image": "", "compose_file": body})
    assert got == {"hash": hashlib.sha256(body.encode()).hexdigest()}


async def test_stop_vm_kills_and_shutdown_vm_asks_as_dstacks(
    api: tuple[Vmm, str], store: EventStore
) -> None:
    """vmm-cli stop -f sends StopVm (a kill), stop sends ShutdownVm (graceful)."""
    _, url = api
    vm_id = await created_stopped(url, "stp")
    await call(url, "StopVm", {"id": vm_id})
    await call(url, "ShutdownVm", {"id": vm_id})
    stops = [e.force for e in await events_of(store, vm_id) if isinstance(e, VmStopRequested)]
    assert stops == [False, True, False]  # CreateVm's `stopped`, then the two calls


async def test_logs_query_tails_follows_and_strips_ansi_as_vmm_cli_logs(
    api: tuple[Vmm, str],
) -> None:
    """``GET /logs?id=&follow=&ansi=false&lines=N`` (vmm-cli logs [-f] [-n N])."""
    vmm, url = api
    vm_id = await created_stopped(url, "logs")
    path = log_file(vmm.backend, vm_id)
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"one\n\x1b[32mtwo\x1b[0m\nthree\n")
    q = f"/logs?id={vm_id}&follow=false&ansi=false&lines=2"
    status, text = await asyncio.to_thread(vmmapi.request, url, "GET", q)
    assert (status, text) == (200, "two\nthree\n")
    status, text = await asyncio.to_thread(
        vmmapi.request, url, "GET", f"/logs?id={vm_id}&ansi=true&lines=2"
    )
    assert text == "\x1b[32mtwo\x1b[0m\nthree\n"
    status, text = await asyncio.to_thread(vmmapi.request, url, "GET", f"/logs/{vm_id}")
    assert (status, text) == (200, "one\n\x1b[32mtwo\x1b[0m\nthree\n")  # pydstack's own path
    conn = aiohttp.UnixConnector(path=url.removeprefix("unix:"))
    async with (
        aiohttp.ClientSession(connector=conn) as s,
        s.get(f"http://localhost/logs?id={vm_id}&follow=true&ansi=false&lines=1") as r,
    ):
        assert await asyncio.wait_for(r.content.readline(), 10) == b"three\n"
        with path.open("ab") as f:
            f.write(b"\x1b[1mfour\x1b[0m\n")
        assert await asyncio.wait_for(r.content.readline(), 10) == b"four\n"
        await call(url, "RemoveVm", {"id": vm_id})
        assert await asyncio.wait_for(r.content.read(), 20) == b""  # the stream ends


def _tls_context() -> ssl.SSLContext:
    """A server context with a throwaway self-signed certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kms")])
    now = datetime.datetime.now(datetime.UTC)
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name)
    builder = builder.public_key(key.public_key()).serial_number(1).not_valid_before(now)
    cert = builder.not_valid_after(now + datetime.timedelta(hours=1)).sign(key, hashes.SHA256())
    with tempfile.TemporaryDirectory() as d:
        Path(d, "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        Path(d, "k.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))  # fmt: skip
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(Path(d, "c.pem"), Path(d, "k.pem"))
    return ctx


async def test_get_app_env_encrypt_pub_key_relays_the_kms_answer(vmm_host: VmmHost) -> None:
    """As dstack's VMM: the first KMS's GetAppEnvEncryptPubKey answer, its signature fields
    unchanged for the caller to check (vmm-cli checks them against its whitelist)."""
    seen: list[Any] = []
    answer = {"public_key": "11" * 32, "signature": "22" * 65, "timestamp": 1700000000,
              "signature_v1": "33" * 65, "extra": "dropped"}  # fmt: skip

    async def pubkey(request: web.Request) -> web.Response:
        seen.append((request.match_info["m"], await request.json()))
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/prpc/{m}", pubkey)
    ctx = _tls_context()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        launch = vmm_host.launch(kms_urls=(f"https://127.0.0.1:{port}",))
        async with running_vmm(vmm_host.store, launch) as (_, ends):
            app_id = "ab" * 20
            got = await call(ends.url, "GetAppEnvEncryptPubKey", {"app_id": app_id})
    finally:
        await runner.cleanup()
    assert got == {k: v for k, v in answer.items() if k != "extra"}
    assert seen == [("GetAppEnvEncryptPubKey", {"app_id": app_id})]
