"""The deploy form and the VM buttons in headless Chromium, checked against the log."""

from __future__ import annotations

import hashlib
import json

from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from playwright.async_api import BrowserContext

from pydstack.core.events import (
    AppRegistered,
    VmRemoveRequested,
    VmRequested,
    VmStartRequested,
    VmStopRequested,
)
from pydstack_guest.kms_provider import decrypt_env

from .conftest import Plane
from .support import log, open_tab

COMPOSE = """services:
  web:
    image: nginx:alpine
    ports: ["80:80"]
"""
ENV = """# secrets, sealed in the browser
API_TOKEN=s3cr3t-üñï
export GREETING="hello world"
"""


def open_sealed(blob: bytes, private_key: bytes) -> dict[str, object]:
    """dstack's decryption: X25519(app key, ephemeral) is the AES-256-GCM key; no AAD."""
    eph, iv, sealed = blob[:32], blob[32:44], blob[44:]
    shared = x25519.X25519PrivateKey.from_private_bytes(private_key).exchange(
        x25519.X25519PublicKey.from_public_bytes(eph)
    )
    plain: dict[str, object] = json.loads(AESGCM(shared).decrypt(iv, sealed, None))
    return plain


async def deploy_through_form(
    plane: Plane, browser: BrowserContext, env: str = ENV, shot: str = "deploy"
) -> str:
    tab = await open_tab(browser, f"{plane.url}deploy")
    p = tab.page
    await p.fill("#name", "shop")
    await p.fill("#compose", COMPOSE)
    await p.fill("#env", env)
    await p.fill("#ports", "20080:80, tcp:0.0.0.0:20443:443")
    await p.fill("#vcpu", "2")
    await p.fill("#memory", "1024")
    await p.fill("#disk", "5")
    await p.click("#preview")
    await p.wait_for_selector("#hash-check.ok")
    assert await p.get_attribute("#env-key", "data-source") == "dev"
    await p.click("#deploy")
    done = await p.wait_for_selector("#deployed")
    vm_id = await done.get_attribute("data-vm")
    assert vm_id
    await tab.shot(shot)
    assert tab.errors == []
    await p.close()
    return vm_id


async def test_deploy_form_registers_app_and_requests_a_scheduled_vm(
    plane: Plane, browser: BrowserContext
) -> None:
    """The form's deploy appends AppRegistered + VmRequested signed by the operator; the env
    sealed in the browser opens with the dev key's private half (dstack-sdk's format); the
    VM shows up scheduled on the VMs page."""
    vm_id = await deploy_through_form(plane, browser)
    events = await log(plane.store)
    [(app_env, app)] = [(e, ev) for e, ev in events if isinstance(ev, AppRegistered)]
    [(vm_env, vm)] = [(e, ev) for e, ev in events if isinstance(ev, VmRequested)]
    assert app_env.actor == vm_env.actor == "operator"
    compose = json.loads(app.compose)
    assert app.compose_hash == hashlib.sha256(app.compose).hexdigest()
    assert app.app_id == app.compose_hash[:40] == vm.app_id
    assert compose["docker_compose_file"] == COMPOSE and compose["name"] == "shop"
    assert compose["allowed_envs"] == ["API_TOKEN", "GREETING"]
    assert vm.vm_id == vm_id and vm.compose_hash == app.compose_hash
    assert (vm.resources.vcpu, vm.resources.memory_mb, vm.resources.disk_gb) == (2, 1024, 5)
    assert [(p.host_address, p.host_port, p.vm_port) for p in vm.ports] == [
        ("127.0.0.1", 20080, 80), ("0.0.0.0", 20443, 443)]  # fmt: skip
    assert b"s3cr3t" not in vm.encrypted_env
    assert open_sealed(vm.encrypted_env, plane.dev_key.private_bytes()) == {
        "env": [{"key": "API_TOKEN", "value": "s3cr3t-üñï"},
                {"key": "GREETING", "value": "hello world"}]}  # fmt: skip
    # ... and so does the guest agent's own decryption, the one a CVM runs at boot.
    assert decrypt_env(plane.dev_key.private_bytes(), vm.encrypted_env) == [
        ("API_TOKEN", "s3cr3t-üñï"), ("GREETING", "hello world")]  # fmt: skip

    tab = await open_tab(browser, f"{plane.url}vms")
    row = tab.page.locator(f"tr[data-vm='{vm_id}'][data-state='scheduled']")
    await row.wait_for()
    assert "h1 (cid 1000)" in await row.inner_text()
    await tab.shot("deploy-scheduled")
    assert tab.errors == []


async def test_deploy_form_shows_server_refusal_naming_the_field(
    plane: Plane, browser: BrowserContext
) -> None:
    """A bad env line never leaves the browser; a bad port comes back as the server's 400."""
    tab = await open_tab(browser, f"{plane.url}deploy")
    await tab.page.fill("#env", "not an assignment")
    await tab.page.click("#deploy")
    err = await tab.page.wait_for_selector("#deploy-error")
    assert "env line 1: expected KEY=VALUE" in await err.inner_text()
    await tab.page.fill("#env", "")
    await tab.page.fill("#ports", "99999:80")
    await tab.page.click("#deploy")
    await tab.page.wait_for_selector("#deploy-error:has-text('ports:')")
    assert [ev for _, ev in await log(plane.store) if isinstance(ev, VmRequested)] == []


async def test_vm_buttons_append_stop_start_remove(plane: Plane, browser: BrowserContext) -> None:
    """Stop, Start and Remove append VmStopRequested, VmStartRequested and VmRemoveRequested
    as the operator, the row follows the desired state, and a removed VM has no buttons."""
    vm_id = await deploy_through_form(plane, browser, env="", shot="deploy-no-env")
    tab = await open_tab(browser, f"{plane.url}vms")
    row = f"tr[data-vm='{vm_id}']"
    await tab.page.wait_for_selector(f"{row}[data-state='scheduled']")
    assert await tab.page.is_disabled(f"{row} button.act-start")
    for action, desired in (("stop", "stopped"), ("start", "running"), ("remove", "removed")):
        await tab.page.click(f"{row} button.act-{action}")
        await tab.page.wait_for_selector(f"{row}[data-desired='{desired}']")
    for action in ("start", "stop", "remove"):
        assert await tab.page.is_disabled(f"{row} button.act-{action}")
    commands = [
        (env.actor, type(ev))
        for env, ev in await log(plane.store)
        if isinstance(ev, VmStopRequested | VmStartRequested | VmRemoveRequested)
    ]
    assert commands == [("operator", VmStopRequested), ("operator", VmStartRequested),
                        ("operator", VmRemoveRequested)]  # fmt: skip
    await tab.shot("vm-removed")
    assert tab.errors == []
