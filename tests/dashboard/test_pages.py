"""Every page in headless Chromium against a real control plane: loads clean, updates live."""

from __future__ import annotations

from playwright.async_api import BrowserContext, Locator

from pydstack.adapters.nats import NEW
from pydstack.core.events import (
    AppRegistered,
    HostJoined,
    VmBootProgress,
    VmRequested,
    VmResources,
    VmStarted,
    subject,
)

from .conftest import Plane
from .support import INSTANCE, open_tab, seed_gateway, seed_kms, wait_for


async def _has(locator: Locator, text: str) -> bool:
    return text in await locator.inner_text()


async def _count_is(locator: Locator, n: int) -> bool:
    return await locator.count() == n


TYPES = "rows => rows.map(r => r.dataset.type)"
PAGES = ("hosts", "apps", "vms", "keys", "gateways", "events", "deploy")


async def _vm(plane: Plane, vm_id: str, app_id: str = "aa" * 20) -> None:
    req = VmRequested(vm_id=vm_id, app_id=app_id, name=vm_id,
                      resources=VmResources(vcpu=2, memory_mb=1024))  # fmt: skip
    await plane.store.append(subject("vm", vm_id), [req], NEW)


async def test_every_page_loads_without_console_errors(
    plane: Plane, browser: BrowserContext
) -> None:
    """Each page renders the seeded log (hosts, app, VM, KMS decisions, gateway route) with no
    console error or uncaught exception; a screenshot of each is kept."""
    await plane.store.append(subject("app", "aa" * 20), [AppRegistered(
        app_id="aa" * 20, compose_hash="bb" * 32, name="shop", compose=b"{}")], NEW)  # fmt: skip
    await _vm(plane, "vm-a")
    await seed_kms(plane.store)
    await seed_gateway(plane.store)
    await wait_for(
        lambda: (
            plane.dash.state.proj.vms.get("vm-a")
            and plane.dash.state.proj.vms["vm-a"].state == "scheduled"
        ),
        what="scheduling",
    )
    expect = {
        "hosts": "h1", "apps": "shop", "vms": "vm-a", "keys": "compose hash not allowed",
        "gateways": INSTANCE[:12], "events": "KeyIssued", "deploy": "Build app-compose",
    }  # fmt: skip
    for name in PAGES:
        tab = await open_tab(browser, f"{plane.url}{name}")
        text = await tab.page.inner_text("main")
        assert expect[name] in text, f"{name} page lacks {expect[name]!r}"
        await tab.shot(name)
        assert tab.errors == [], f"{name}: {tab.errors}"
        await tab.page.close()


async def test_keys_page_shows_boot_info_of_issued_and_denied(
    plane: Plane, browser: BrowserContext
) -> None:
    """Each decision row names its outcome, and its BootInfo opens to show the TCB status."""
    await seed_kms(plane.store)
    tab = await open_tab(browser, f"{plane.url}keys")
    await tab.page.wait_for_selector("tr[data-request='req-ok'][data-outcome='issued']")
    denied = tab.page.locator("tr[data-request='req-no'][data-outcome='denied']")
    await denied.locator("summary").click()
    text = await denied.inner_text()
    assert "OutOfDate" in text and "mr_aggregated" in text and "compose hash not allowed" in text
    assert tab.errors == []


async def test_event_appended_meanwhile_shows_up_live(
    plane: Plane, browser: BrowserContext
) -> None:
    """With the pages open, new events reach the event stream, the VM table and the hosts'
    usage without a reload."""
    events = await open_tab(browser, f"{plane.url}events")
    vms = await open_tab(browser, f"{plane.url}vms")
    hosts = await open_tab(browser, f"{plane.url}hosts")
    for tab in (events, vms, hosts):
        await tab.page.evaluate("window.__noReload = true")
    await _vm(plane, "vm-live")
    await plane.store.append(subject("vm", "vm-x"), [VmRequested(
        vm_id="vm-x", app_id="aa" * 20, name="x", resources=VmResources(vcpu=1, memory_mb=64),
    )], NEW)  # fmt: skip
    await vms.page.wait_for_selector("tr[data-vm='vm-live'][data-state='scheduled']")
    seq = plane.dash.state.proj.vms["vm-live"].seq
    await events.page.wait_for_selector(f"#events tr[data-seq='{seq}'][data-type='VmScheduled']")
    h1 = hosts.page.locator("tr[data-host='h1']")
    await wait_for(lambda: _has(h1, "3 / 8 vCPU"), what="h1 usage 3 / 8 vCPU")
    _, version = await plane.store.read_aggregate(subject("vm", "vm-live"))
    await plane.store.append(subject("vm", "vm-live"), [
        VmStarted(vm_id="vm-live", host="h1", pid=42),
        VmBootProgress(vm_id="vm-live", stage="done", detail="app up")], version)  # fmt: skip
    row = vms.page.locator("tr[data-vm='vm-live'][data-state='running']")
    await row.wait_for()
    assert "done: app up" in await row.inner_text()
    for tab in (events, vms, hosts):
        assert await tab.page.evaluate("window.__noReload") is True
        assert tab.errors == []
    await vms.shot("vms-live")


async def test_event_filters_by_type_and_subject(plane: Plane, browser: BrowserContext) -> None:
    """The filter form keeps only matching events, in the listing and live."""
    await _vm(plane, "vm-f")
    tab = await open_tab(browser, f"{plane.url}events")
    await tab.page.fill("input[name='type']", "HostJoined")
    await tab.page.click("#filters button")
    await tab.page.wait_for_url("**/events?**type=HostJoined**")
    await tab.page.wait_for_selector("main[data-loaded]")
    await tab.page.wait_for_selector("body[data-live='live']")
    types = await tab.page.eval_on_selector_all(
        "#events tbody tr", "rs => rs.map(r => r.dataset.type)"
    )
    assert types == ["HostJoined"]
    await _vm(plane, "vm-g")  # not a HostJoined: must not appear
    await plane.store.append(subject("host", "h2"), [HostJoined(host_id="h2")], NEW)
    rows = tab.page.locator("#events tbody tr")
    await wait_for(lambda: _count_is(rows, 2), what="the second HostJoined row")
    types = await tab.page.eval_on_selector_all(
        "#events tbody tr", "rs => rs.map(r => r.dataset.type)"
    )
    assert types == ["HostJoined", "HostJoined"]
    await tab.page.goto(f"{plane.url}events?subject=dstack.vm.*")
    await tab.page.wait_for_selector("main[data-loaded]")
    subjects = await tab.page.eval_on_selector_all(
        "#events tbody tr td:nth-child(3)", "cs => cs.map(c => c.innerText)"
    )
    assert subjects and all(s.startswith("dstack.vm.") for s in subjects)
    assert tab.errors == []
