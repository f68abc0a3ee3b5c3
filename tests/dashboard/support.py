"""Helpers for the dashboard tests: seed the log, read it back, drive headless Chromium."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.async_api import BrowserContext, ConsoleMessage, Page

from pydstack.adapters.nats import NEW, EventStore
from pydstack.core.events import (
    AnyEvent,
    BootInfo,
    CvmRegistered,
    Envelope,
    GatewayNodeJoined,
    KeyDenied,
    KeyIssued,
    KeyRequested,
    TunnelIpAllocated,
    decode_body,
    open_envelope,
    subject,
)

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "dashboard"
APP_ID = "ab" * 20
INSTANCE = "cd" * 20


@dataclass
class Tab:
    """A page plus every console error and uncaught exception it produced."""

    page: Page
    errors: list[str] = field(default_factory=list)

    async def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path


async def open_tab(ctx: BrowserContext, url: str) -> Tab:
    page = await ctx.new_page()
    tab = Tab(page)

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type == "error":
            tab.errors.append(f"console: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: tab.errors.append(f"pageerror: {exc}"))
    await page.goto(url)
    # The page has rendered its data and opened its live stream.
    await page.wait_for_selector("main[data-loaded]")
    await page.wait_for_selector("body[data-live='live']")
    return tab


async def log(store: EventStore) -> list[tuple[Envelope, AnyEvent]]:
    """Everything on the stream, decoded."""
    out = []
    async for rec in store.read():
        env = open_envelope(rec.data)
        event = decode_body(env)
        assert event is not None
        out.append((env, event))
    return out


async def wait_for(check: Callable[[], Any], timeout: float = 10.0, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def boot(tcb: str = "UpToDate") -> BootInfo:
    return BootInfo(
        tcb_status=tcb, app_id=APP_ID, compose_hash="ef" * 32, instance_id=INSTANCE,
        mr_aggregated="12" * 32, os_image_hash="34" * 32, device_id="56" * 32,
    )  # fmt: skip


async def seed_kms(store: EventStore) -> None:
    """One key issued and one denied on the KMS aggregate, each after its request."""
    subj = subject("kms", "main")
    await store.append(subj, [
        KeyRequested(request_id="req-ok", app_id=APP_ID, instance_id=INSTANCE, method="GetAppKey"),
        KeyIssued(request_id="req-ok", boot_info=boot(), quote_hash="aa" * 32, backend="webhook",
                  verdict="allowed"),
        KeyRequested(request_id="req-no", app_id=APP_ID, method="GetAppKey"),
        KeyDenied(request_id="req-no", reason="backend webhook denied: compose hash not allowed",
                  boot_info=boot("OutOfDate")),
    ], NEW)  # fmt: skip


async def seed_gateway(store: EventStore) -> None:
    """A gateway node and one admitted, registered instance of the default cluster."""
    key = "Zm9v" + "A" * 39 + "="
    await store.append(subject("gateway", "default"), [
        GatewayNodeJoined(node_id="gw-1", wg_public_key="R" * 43 + "=", tunnel_ip="10.0.0.1",
                          endpoint="127.0.0.1:51820", base_domain="app.example.com"),
        TunnelIpAllocated(cluster="default", instance_id=INSTANCE, app_id=APP_ID,
                          wg_public_key=key, tunnel_ip="10.0.0.2"),
    ], NEW)  # fmt: skip
    await store.append(subject("cvm", INSTANCE), [
        CvmRegistered(app_id=APP_ID, instance_id=INSTANCE, compose_hash="ef" * 32,
                      wg_public_key=key, tunnel_ip="10.0.0.2"),
    ], NEW)  # fmt: skip


def fresh_profile(base: Path) -> Path:
    path = base / f"chromium-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir(parents=True)
    return path
