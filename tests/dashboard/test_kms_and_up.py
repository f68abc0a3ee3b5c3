"""The env key from a real KMS (sealed in the browser, opened with the KMS-derived key), the
event stream's resume point, and the dashboard inside `pydstack up` with its identities."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
from playwright.async_api import BrowserContext

from pydstack.actors.dashboard import Dashboard, DashboardConfig
from pydstack.adapters.nats import NEW
from pydstack.core.events import AppRegistered, HostJoined, VmRequested, subject
from pydstack.core.kms.derive import env_crypt_key, k256_public
from pydstack_guest.kms_provider import decrypt_env
from tests.cli.harness import Up, cli
from tests.kms.conftest import CLUSTER, Kms

from .conftest import Plane
from .support import log, open_tab, wait_for

COMPOSE = "services:\n  api:\n    image: busybox\n"


async def test_browser_seals_env_to_the_kms_key_checked_against_the_root_on_the_log(
    plane: Plane,
    kms: Kms,
    browser: BrowserContext,
) -> None:
    """With a KMS configured, the form shows the key as the KMS's (signature checked against
    the KmsRootCreated root on the log), and what it seals opens with the app's env key the
    KMS derives from its root: what a CVM gets at boot."""
    cfg = DashboardConfig(port=0, kms_url=kms.url, kms_cluster=CLUSTER)
    async with await Dashboard.create(plane.operator, cfg) as dash:
        await dash.follower.ready.wait()
        root = dash.state.kms_root(CLUSTER)
        assert root is not None and root.k256_public_key == k256_public(kms.svc.root.k256)
        tab = await open_tab(browser, f"{dash.url}deploy")
        await tab.page.fill("#compose", COMPOSE)
        await tab.page.fill("#env", "DB_PASSWORD=hunter2")
        await tab.page.click("#deploy")
        done = await tab.page.wait_for_selector("#deployed")
        vm_id = await done.get_attribute("data-vm")
        key = tab.page.locator("#env-key[data-source='kms']")
        assert "signature checked against the KMS root on the log" in await key.inner_text()
        await tab.shot("deploy-kms")
        assert tab.errors == []
    [vm] = [ev for _, ev in await log(plane.store) if isinstance(ev, VmRequested)]
    assert vm.vm_id == vm_id
    secret = env_crypt_key(kms.svc.root, bytes.fromhex(vm.app_id))
    assert decrypt_env(secret, vm.encrypted_env) == [("DB_PASSWORD", "hunter2")]


async def test_stream_resumes_after_last_event_id(plane: Plane) -> None:
    """A reconnecting browser sends Last-Event-ID and gets exactly the events after it."""
    for i in range(3):
        await plane.store.append(subject("host", f"r{i}"), [HostJoined(host_id=f"r{i}")], NEW)
    last = await plane.store.last_seq()
    await wait_for(lambda: plane.dash.state.seq == last, what="the dashboard to catch up")
    async with (
        aiohttp.ClientSession() as s,
        s.get(plane.url + "api/stream", headers={"Last-Event-ID": str(last - 2)}) as r,
    ):
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines: list[str] = []
        while not any(x.startswith("event: update") for x in lines):
            lines.append((await asyncio.wait_for(r.content.readline(), 5)).decode().strip())
        data = json.loads((await r.content.readline()).decode().removeprefix("data: "))
    assert [e["seq"] for e in data["events"]] == [last - 1, last]


def test_up_serves_the_dashboard_and_signs_commands_as_operator(tmp_path: Path) -> None:
    """`pydstack up` logs the dashboard URL and its login token file (0600) in its ready line
    and state.json; a deploy through it with that token (a client with no Origin) is signed by
    the operator identity (and allowed by the server's permissions for it)."""
    up = Up(tmp_path / "data", extra=("--dashboard-port", "0", "--no-kms")).start()
    try:
        ready = up.ready()
        assert ready is not None
        url, token_file = ready["dashboard"], Path(ready["dashboard_login_token_file"])
        assert url.startswith("http://127.0.0.1:")
        state = json.loads((tmp_path / "data" / "state.json").read_text())
        assert (state["dashboard_url"], state["dashboard_login_token_file"]) == (
            url, str(token_file))  # fmt: skip
        assert token_file.stat().st_mode & 0o777 == 0o600
        bearer = {"Authorization": f"Bearer {token_file.read_text().strip()}"}

        async def deploy() -> tuple[int, dict[str, str], dict[str, str]]:
            async with aiohttp.ClientSession(headers=bearer) as s:
                async with s.post(url + "api/compose", json={"name": "u", "compose": COMPOSE}) as r:
                    preview = await r.json()
                body = {"app_compose": preview["app_compose"], "vm_id": "up-vm"}
                async with s.post(url + "api/deploy", json=body) as r:
                    return r.status, await r.json(), preview["env_key"]

        async def page() -> tuple[str, dict[str, str]]:
            async with aiohttp.ClientSession(headers=bearer) as s:
                async with s.get(url) as r:
                    html = await r.text()
                async with s.get(url + "api/status") as r:
                    return html, await r.json()

        # simulation is never silent: no TDX here, every page and the status say so
        html, st = asyncio.run(page())
        assert (
            '<div id="tee-banner" role="alert">SIMULATED TDX' in html and st["tee"] == "simulated"
        )
        assert state["tee"] == "simulated" and "SIMULATED TDX" in ready["attestation"]
        assert "SIMULATED TDX" in cli(tmp_path / "data", "status").out

        status, got, key = asyncio.run(deploy())
        assert status == 201, got
        assert key["source"] == "dev" and (tmp_path / "data" / "dashboard" / "dev-env.key").exists()
        lines = cli(tmp_path / "data", "events", "--json").lines()
        mine = [x for x in lines if x["type"] in (AppRegistered.__name__, VmRequested.__name__)]
        got_types = [(x["type"], x["actor"]) for x in mine]
        assert got_types == [("AppRegistered", "operator"), ("VmRequested", "operator")]
    finally:
        assert up.stop() == 0
