"""The JSON API on a real control plane: what the pages show, and 4xx naming the bad field."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from pydstack.actors.dashboard import Dashboard, DashboardConfig
from pydstack.adapters.nats import NEW, EventStore
from pydstack.core.events import HostJoined, subject

from .conftest import Plane
from .plane import page_headers
from .support import log, seed_gateway, seed_kms, wait_for

COMPOSE = json.dumps({"manifest_version": 2, "name": "api", "runner": "docker-compose",
                      "allowed_envs": ["A"]}, indent=4)  # fmt: skip


async def call(url: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    """GET, or POST as the dashboard's page does (its Origin and CSRF token, unless ``kw``'s
    headers say otherwise)."""
    async with aiohttp.ClientSession() as s:
        if body is None and not kw:
            async with s.get(url + path) as r:
                return r.status, await r.json()
        kw.setdefault("json", body)
        kw["headers"] = await page_headers(s, url) | kw.get("headers", {})
        async with s.post(url + path, **kw) as r:
            return r.status, await r.json()


async def test_views_serve_the_folded_log(plane: Plane) -> None:
    """hosts, keys and gateways come from the log as folded; X-Pydstack-Seq names the seq."""
    await seed_kms(plane.store)
    await seed_gateway(plane.store)
    last = await plane.store.last_seq()
    await wait_for(lambda: plane.dash.state.seq == last, what="the dashboard to catch up")
    _, hosts = await call(plane.url, "api/hosts")
    assert [(h["host_id"], h["vcpu"], h["vcpu_free"]) for h in hosts] == [("h1", 8, 8)]
    _, keys = await call(plane.url, "api/keys")
    assert [(d["request_id"], d["outcome"], d["boot_info"]["tcb_status"])
            for d in keys["decisions"]] == [("req-no", "denied", "OutOfDate"),
                                            ("req-ok", "issued", "UpToDate")]  # fmt: skip
    assert keys["clusters"][0]["issued"] == 1 and keys["clusters"][0]["denied"] == 1
    _, [gw] = await call(plane.url, "api/gateways")
    assert [r["tunnel_ip"] for r in gw["routes"]] == ["10.0.0.2"]
    assert gw["gateways"][0]["node_id"] == "gw-1" and len(gw["digest"]) == 64
    async with aiohttp.ClientSession() as s, s.get(plane.url + "api/status") as r:
        assert r.headers["X-Pydstack-Seq"] == str(last)
        assert (await r.json())["identity"] == "operator"


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("api/events?since=x", None, 400, "since: 'x' is not an integer"),
        ("api/events?limit=0", None, 400, "limit: '0' is not an integer in 1..1000"),
        ("api/env-key?app_id=zz", None, 400, "app_id: expected 20 bytes"),
        ("api/nope", None, 404, "path: no endpoint /api/nope"),
        ("api/vms/missing", None, 404, "vm_id: no vm missing"),
        ("api/deploy", {"app_compose": COMPOSE, "vcpu": "2"}, 400, "vcpu: Expected `int`"),
        (
            "api/deploy",
            {"app_compose": COMPOSE, "cpu": 2},
            400,
            "body: Object contains unknown field `cpu`",
        ),
        ("api/deploy", {"app_compose": "{}"}, 400, "app_compose: not an app-compose.json"),
        ("api/deploy", {"app_compose": COMPOSE, "ports": ["8080"]}, 400, "ports: '8080'"),
        ("api/deploy", {"app_compose": COMPOSE, "vcpu": 0}, 400, "vcpu: 0 is out of range"),
        (
            "api/deploy",
            {"app_compose": COMPOSE, "compose_hash": "00"},
            400,
            "compose_hash: 00 is not the sha256",
        ),
        (
            "api/deploy",
            {"app_compose": COMPOSE, "encrypted_env": "abc"},
            400,
            "encrypted_env: not hex",
        ),
        (
            "api/deploy",
            {"app_compose": COMPOSE, "encrypted_env": "00" * 20},
            400,
            "encrypted_env: 20 bytes is too short",
        ),
        (
            "api/deploy",
            {"app_compose": COMPOSE, "env_names": ["B"]},
            400,
            "env_names: B not in the app-compose's allowed_envs",
        ),
        ("api/deploy", {"app_compose": COMPOSE, "vm_id": "a b"}, 400, "vm_id: bad vm id"),
        (
            "api/compose",
            {"name": "x", "compose": "services: {}", "env_names": ["1X"]},
            400,
            "env_names: '1X' is not an env var name",
        ),
        ("api/compose", {"name": "", "compose": "services: {}"}, 400, "name: empty"),
        ("api/vms/missing/stop", {}, 404, "no vm missing"),
        ("api/vms/missing/reboot", {}, 404, "unknown action 'reboot'"),
    ],
)
async def test_bad_input_is_a_4xx_naming_the_field(
    plane: Plane, path: str, body: Any, status: int, error: str
) -> None:
    """Each bad request is refused with its status and a one-line error naming the field,
    and nothing is appended."""
    before = await plane.store.last_seq()
    got_status, got = await call(plane.url, path, body)
    assert (got_status, got["error"][: len(error)]) == (status, error), got
    assert "\n" not in got["error"]
    assert await plane.store.last_seq() == before


async def test_posts_need_json_from_the_same_origin(plane: Plane) -> None:
    """A cross-site form post or another origin's script cannot append commands."""
    status, got = await call(
        plane.url,
        "api/deploy",
        data="app_compose=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert (status, got["error"]) == (415, "content-type: send application/json")
    status, got = await call(plane.url, "api/deploy", {"app_compose": COMPOSE},
                             headers={"Origin": "http://evil.example"})  # fmt: skip
    assert status == 403 and got["error"].startswith("origin: http://evil.example")


async def test_deploy_is_one_atomic_commit_then_unchanged(plane: Plane) -> None:
    """A deploy appends AppRegistered + VmRequested; a second VM of the same compose leaves the
    app unchanged; reusing a VM id is refused; a command that means nothing is a 409."""
    status, first = await call(plane.url, "api/deploy", {"app_compose": COMPOSE, "vm_id": "v1"})
    assert status == 201 and first["app"] == "registered"
    status, second = await call(plane.url, "api/deploy", {"app_compose": COMPOSE, "vm_id": "v2"})
    assert status == 201 and second["app"] == "unchanged"
    assert second["app_id"] == first["app_id"]
    status, again = await call(plane.url, "api/deploy", {"app_compose": COMPOSE, "vm_id": "v1"})
    assert status == 400 and again["error"].startswith("vm_id: vm v1 already exists")
    types = [type(ev).__name__ for _, ev in await log(plane.store)]
    assert types.count("AppRegistered") == 1 and types.count("VmRequested") == 2
    status, got = await call(plane.url, "api/vms/v1/start", {})
    assert status == 409 and "already meant to run" in got["error"]
    assert (await call(plane.url, "api/vms/v1/stop", {}))[0] == 200
    status, got = await call(plane.url, "api/vms/v1/stop", {})
    assert status == 409 and "already stopping or stopped" in got["error"]
    status, got = await call(plane.url, "api/vms/v1/stop", {"force": True})
    assert status == 200 and got["event"] == "VmStopRequested"


async def test_events_older_than_the_window_come_from_the_store(
    plane: Plane, store: EventStore
) -> None:
    """With a 3-event window, /api/events?since=0-ish still lists every event in order, with
    the filters applied to the part read back from NATS too."""
    for i in range(6):
        await store.append(subject("host", f"x{i}"), [HostJoined(host_id=f"x{i}")], NEW)
    small = DashboardConfig(port=0, event_window=3, dev_env_key=plane.dev_key.path)
    async with await Dashboard.create(plane.operator, small) as dash:
        await dash.follower.ready.wait()
        assert len(dash.state.events) == 3
        _, rows = await call(dash.url, "api/events?since=1&limit=100")
        assert [r["seq"] for r in rows] == list(range(2, 8))
        _, rows = await call(dash.url, "api/events?since=1&subject=dstack.host.x1")
        assert [r["subject"] for r in rows] == ["dstack.host.x1"]
        _, rows = await call(dash.url, "api/events?since=1&limit=2")
        assert [r["seq"] for r in rows] == [2, 3]
