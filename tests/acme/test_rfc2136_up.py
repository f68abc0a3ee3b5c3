"""The operator's path: ``pydstack up --gateway-acme-directory ... --gateway-rfc2136-*`` makes
up's gateway node order its wildcard certificate from pebble through RFC 2136 updates to a
real Knot server, which pebble asks; bad RFC 2136 options are refused before anything starts."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from pydstack.cli.main import main
from tests.cli.harness import Up, kill_processes_under
from tests.netns import Netns, entered

from .knot import KEY_NAME, Knot, missing_knot, running_knot
from .pebble import Pebble, missing_binaries, running_pebble

BASE = "apps.example.com"


async def _status(admin_url: str) -> dict[str, object]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
        s.get(admin_url + "/status") as resp,
    ):
        resp.raise_for_status()
        out: dict[str, object] = await resp.json()
        return out


@pytest.mark.timeout(180)
async def test_up_orders_its_certificate_through_rfc2136(short_tmp: Path) -> None:
    if missing_knot() or missing_binaries():
        pytest.fail("knotd or pebble not installed: run `make sysdeps` (Debian knot, pebble)")
    # everything in a namespace of its own: up's gateway (a WireGuard tunnel network, in its
    # namespace) never meets another gateway on this machine, and no traffic leaves loopback
    with Netns.create("rfc2136") as ns, entered(ns):
        async with (
            running_knot(short_tmp / "knot") as knot,
            running_pebble(short_tmp / "pebble", dns_server=knot.address) as peb,
        ):
            await _up_orders(short_tmp, ns, knot, peb)
        kill_processes_under(short_tmp)


def _start(ns: Netns, up: Up) -> Up:
    with entered(ns):  # a worker thread: up's processes are started in ns too
        return up.start()


async def _up_orders(tmp: Path, ns: Netns, knot: Knot, peb: Pebble) -> None:
    home = tmp / "home"  # wireguard-go's UAPI socket path must fit in sun_path
    extra = ("--listen", "127.0.0.1", "--dashboard-port", "-1", "--gateway",
             "--gateway-domain", BASE, "--no-gateway-forward-guard",
             "--gateway-acme-directory", peb.directory_url,
             "--gateway-acme-ca-bundle", peb.ca_bundle,
             "--gateway-rfc2136-server", knot.address, "--gateway-rfc2136-zone", knot.zone,
             "--gateway-rfc2136-tsig-name", KEY_NAME,
             "--gateway-rfc2136-tsig-secret-file", str(knot.secret_file))  # fmt: skip
    plane = await asyncio.to_thread(_start, ns, Up(home, extra=extra))
    try:
        state = json.loads((home / "state.json").read_text())
        deadline, status = time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            status = await _status(state["gateway_admin_url"])
            certs = status.get("certificates")
            if isinstance(certs, dict) and certs.get(BASE):
                break
            await asyncio.sleep(0.5)
        certs = status.get("certificates")
        assert isinstance(certs, dict) and certs.get(BASE), (status, plane.text()[-3000:])
        assert "DDNS, finished" in knot.log.read_text()  # the records went in as updates
        assert await knot.txt(f"_acme-challenge.{BASE}.") == []  # and are gone again
        assert knot.secret_file.read_text().strip() not in plane.text()  # the secret never
    finally:
        assert await asyncio.to_thread(plane.stop) == 0, plane.text()[-3000:]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--gateway-rfc2136-server", "127.0.0.1"], "needs --gateway-rfc2136-zone"),
        (["--gateway-rfc2136-zone", "example.com"], "need --gateway-rfc2136-server"),
        (["--gateway-rfc2136-server", "127.0.0.1", "--gateway-rfc2136-zone", "example.com",
          "--gateway-rfc2136-tsig-name", "k", "--gateway-rfc2136-tsig-secret-file", "SECRET"],
         "readable by others"),
        (["--gateway-rfc2136-server", "127.0.0.1", "--gateway-rfc2136-zone", "example.com",
          "--gateway-rfc2136-tsig-name", "k", "--gateway-rfc2136-tsig-secret-file", "GOOD"],
         "needs --gateway-acme-directory"),
    ],
)  # fmt: skip
def test_up_refuses_unusable_rfc2136_options_before_starting(
    tmp_path: Path, args: list[str], error: str
) -> None:
    open_secret = tmp_path / "open.secret"
    open_secret.write_text("c2VjcmV0LW9mLWFub3RoZXIta2V5LTMyLWJ5dGVz\n")
    open_secret.chmod(0o644)
    good = tmp_path / "good.secret"
    good.write_text("c2VjcmV0LW9mLWFub3RoZXIta2V5LTMyLWJ5dGVz\n")
    good.chmod(0o600)
    args = [{"SECRET": str(open_secret), "GOOD": str(good)}.get(a, a) for a in args]
    home = tmp_path / "home"
    result = CliRunner().invoke(main, ["up", "--data-dir", str(home), *args])
    assert result.exit_code == 2, result.output
    assert error in result.output
    assert not (home / "nats").exists()  # nothing started


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--rfc2136-server", "127.0.0.1", "--cluster-secret", "GOOD"],
         "needs --rfc2136-zone"),
        (["--rfc2136-tsig-name", "k", "--cluster-secret", "GOOD"], "need --rfc2136-server"),
        (["--rfc2136-server", "127.0.0.1", "--rfc2136-zone", "example.com",
          "--rfc2136-tsig-name", "k", "--rfc2136-tsig-secret-file", "GOOD"],
         "need --cluster-secret"),
        (["--rfc2136-server", "127.0.0.1:0", "--rfc2136-zone", "example.com",
          "--rfc2136-tsig-name", "k", "--rfc2136-tsig-secret-file", "GOOD",
          "--cluster-secret", "GOOD"], "expected HOST, HOST:PORT"),
    ],
)  # fmt: skip
def test_a_gateway_node_refuses_unusable_rfc2136_options(
    tmp_path: Path, args: list[str], error: str
) -> None:
    from pydstack.actors.gateway.__main__ import main as gateway_main

    good = tmp_path / "good.secret"
    good.write_text("c2VjcmV0LW9mLWFub3RoZXIta2V5LTMyLWJ5dGVz\n")
    good.chmod(0o600)
    args = [str(good) if a == "GOOD" else a for a in args]
    base = ["--nats", "nats://127.0.0.1:1", "--node-id", "gw1", "--base-domain", BASE,
            "--endpoint", "127.0.0.1:51820", "--state-dir", str(tmp_path / "gw")]  # fmt: skip
    result = CliRunner().invoke(gateway_main, [*base, *args])
    assert result.exit_code in (1, 2), result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert error in line  # one line: what is wrong
    assert not (tmp_path / "gw").exists()  # nothing started
