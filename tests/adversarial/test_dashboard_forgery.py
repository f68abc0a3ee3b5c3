"""The dashboard cannot be read or written through DNS rebinding or cross-site requests (issue
12.5): a rebound name reaches it with the attacker's Host and a matching Origin, so Host is
checked against an allowlist on every request; writes need the page's CSRF token (or the login
token as a Bearer header); a dashboard not bound to loopback wants the login token for
everything. Against a real dashboard over a real nats-server."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import async_playwright

from pydstack.actors.dashboard import (
    Dashboard,
    DashboardConfig,
    GuardError,
    allowed_hosts,
    load_or_create_token,
    needs_login,
)
from tests.dashboard import plane as dashboard
from tests.dashboard.plane import Plane, origin_of, page_headers
from tests.dashboard.support import CHROMIUM, FLAGS, fresh_profile

plane = dashboard.plane  # the fixture: dashboard, scheduler and nats-server (tests/dashboard)

COMPOSE = json.dumps({"manifest_version": 2, "name": "forged", "runner": "docker-compose"})
DEPLOY = {"app_compose": COMPOSE, "vm_id": "forged"}


def _evil(url: str) -> tuple[str, str]:
    """The Host and Origin a page at a rebound name (evil.example -> 127.0.0.1) sends."""
    port = url.rstrip("/").rsplit(":", 1)[1]
    return f"evil.example:{port}", f"http://evil.example:{port}"


async def _post(url: str, path: str, headers: dict[str, str], **kw: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=DEPLOY, headers=headers,
                                                     **kw) as r:  # fmt: skip
        return r.status, await r.json()


async def test_rebound_name_cannot_write_though_origin_matches_host(plane: Plane) -> None:
    """A write whose Host and Origin are both the attacker's name is 403, and nothing is
    appended to the log."""
    before = await plane.store.last_seq()
    host, origin = _evil(plane.url)
    status, got = await _post(plane.url, "api/deploy", {"Host": host, "Origin": origin})
    assert status == 403 and got["error"].startswith(f"host: {host} is not a name"), got
    assert await plane.store.last_seq() == before


@pytest.mark.parametrize("path", ["", "vms", "api/vms", "api/status", "api/stream"])
async def test_rebound_name_cannot_read(plane: Plane, path: str) -> None:
    """Pages, views and the event stream are 403 under a foreign Host, with a one-line JSON
    error."""
    host, _ = _evil(plane.url)
    async with aiohttp.ClientSession() as s, s.get(plane.url + path, headers={"Host": host}) as r:
        assert r.status == 403 and r.content_type == "application/json"
        assert "\n" not in (await r.json())["error"]


async def test_write_without_origin_is_refused(plane: Plane) -> None:
    """A write with the right Host and even the page's CSRF token but no Origin (and no login
    token) is 403 and appends nothing."""
    before = await plane.store.last_seq()
    async with aiohttp.ClientSession() as s:
        headers = await page_headers(s, plane.url)
    del headers["Origin"]
    status, got = await _post(plane.url, "api/deploy", headers)
    assert status == 403 and got["error"].startswith("origin: a write needs"), got
    assert await plane.store.last_seq() == before


@pytest.mark.parametrize("token", [None, "", "wrong", "x" * 43])
async def test_write_needs_the_pages_csrf_token(plane: Plane, token: str | None) -> None:
    """Right Host and Origin but a missing or wrong X-CSRF-Token: 403, nothing appended; with
    the token the page carries, the same write is accepted."""
    before = await plane.store.last_seq()
    headers = {"Origin": origin_of(plane.url)} | ({} if token is None else {"X-CSRF-Token": token})
    status, got = await _post(plane.url, "api/deploy", headers)
    assert status == 403 and got["error"].startswith("csrf: missing or wrong"), got
    assert await plane.store.last_seq() == before
    async with aiohttp.ClientSession() as s:
        good = await page_headers(s, plane.url)
    status, got = await _post(plane.url, "api/deploy", good)
    assert status == 201, got
    assert await plane.store.last_seq() > before


async def test_login_token_as_bearer_writes_without_origin(plane: Plane) -> None:
    """A non-browser client writes with the login token (Authorization: Bearer) and no Origin;
    a wrong Bearer token is 401 and appends nothing."""
    before = await plane.store.last_seq()
    status, _ = await _post(plane.url, "api/deploy", {"Authorization": "Bearer nope"})
    assert status == 401 and await plane.store.last_seq() == before
    auth = {"Authorization": f"Bearer {plane.dash.login_token}"}
    status, got = await _post(plane.url, "api/deploy", auth)
    assert status == 201, got


def test_login_is_needed_unless_bound_to_loopback() -> None:
    """Whether the login token is required depends on the bind address alone; a wildcard bind
    is reachable over loopback too, so the loopback names are in its Host allowlist."""
    assert [needs_login(a) for a in ("127.0.0.1", "127.0.0.2", "::1", "localhost")] == [False] * 4
    assert [needs_login(a) for a in ("0.0.0.0", "::", "10.0.0.5", "dash.lan")] == [True] * 4
    assert allowed_hosts("0.0.0.0", 81) == {"127.0.0.1:81", "localhost:81", "[::1]:81"}
    assert allowed_hosts("::1", 81) == {"127.0.0.1:81", "localhost:81", "[::1]:81"}
    assert allowed_hosts("10.0.0.5", 81, ("Dash.LAN", "proxy:443")) == {
        "10.0.0.5:81", "dash.lan", "dash.lan:81", "proxy:443"}  # fmt: skip
    for bad in ("evil/x", "a b", "x:0", "x:99999", "[nothost]:1", ""):
        with pytest.raises(GuardError):
            allowed_hosts("127.0.0.1", 81, (bad,))


async def test_wildcard_bind_needs_the_login_token(plane: Plane, tmp_path: Path) -> None:
    """Bound to 0.0.0.0 (reached here over 127.0.0.1): every route is 401 without the login
    token; Bearer works; opening /?token= once sets an HttpOnly SameSite=Strict cookie that
    then works for reads, and for writes together with Origin and the CSRF token."""
    cfg = DashboardConfig(port=0, host="0.0.0.0", login_token_file=tmp_path / "login-token")
    async with await Dashboard.create(plane.operator, cfg) as dash:
        await dash.follower.ready.wait()
        url, token = dash.url, dash.login_token
        assert url.startswith("http://127.0.0.1:") and dash.guard and dash.guard.login_required
        before = await plane.store.last_seq()
        async with aiohttp.ClientSession() as s:
            for path in ("", "api/vms", "api/stream", f"?token={'x' * 43}"):
                async with s.get(url + path) as r:
                    assert r.status == 401, path
            async with s.post(url + "api/deploy", json=DEPLOY,
                              headers={"Origin": origin_of(url)}) as r:  # fmt: skip
                assert r.status == 401
            bearer = {"Authorization": f"Bearer {token}"}
            async with s.get(url + "api/vms", headers=bearer) as r:
                assert r.status == 200
        assert await plane.store.last_seq() == before
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            async with s.get(f"{url}?token={token}") as r:
                assert r.status == 200
                cookie = r.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token in cookie
            async with s.get(url + "api/vms") as r:
                assert r.status == 200
            headers = await page_headers(s, url)
            async with s.post(url + "api/deploy", json=DEPLOY, headers=headers) as r:
                assert r.status == 201, await r.text()


def test_login_token_file_is_private_and_kept(tmp_path: Path) -> None:
    """The token file is made 0600 and read back unchanged on the next start; a token file
    others may read is refused."""
    path = tmp_path / "dashboard" / "login-token"
    token = load_or_create_token(path)
    assert path.stat().st_mode & 0o777 == 0o600 and len(token) >= 32
    assert load_or_create_token(path) == token
    assert os.listdir(path.parent) == ["login-token"]  # no temp file left behind
    path.chmod(0o644)
    with pytest.raises(GuardError, match="readable by others"):
        load_or_create_token(path)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
async def test_rebinding_page_in_a_real_browser_can_neither_read_nor_write(
    plane: Plane, tmp_path: Path
) -> None:
    """Chromium resolving evil.example to 127.0.0.1 (the rebinding done): a script of the
    evil.example origin gets 403 for the page, a view and a same-origin JSON deploy, and the
    log is unchanged."""
    _, origin = _evil(plane.url)
    before = await plane.store.last_seq()
    async with async_playwright() as p:
        ctx = await p.chromium.launch_persistent_context(
            str(fresh_profile(tmp_path)), executable_path=CHROMIUM, headless=True,
            args=[*FLAGS, "--host-resolver-rules=MAP evil.example 127.0.0.1"],
        )  # fmt: skip
        try:
            page = await ctx.new_page()
            resp = await page.goto(f"{origin}/")
            assert resp is not None
            got = [resp.status, *await page.evaluate(
                """async (body) => {
                    const read = await fetch("/api/vms");
                    const write = await fetch("/api/deploy", {method: "POST", body,
                        headers: {"Content-Type": "application/json"}});
                    return [read.status, write.status];
                }""",
                json.dumps(DEPLOY),
            )]  # fmt: skip
        finally:
            await ctx.close()
    assert got == [403, 403, 403]
    assert await plane.store.last_seq() == before
