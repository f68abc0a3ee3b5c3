"""The issue's done-when: with `pydstack up`, a simulated CVM registered through RA-TLS (keys
from up's KMS) is reachable at its app URL through two gateways (up's own node and a second
node process), and `pydstack gateway routes --json` prints the same table on both. Twice: with
up's offline dev CA, and with ``--gateway-acme-directory`` against a real pebble (up's node
orders the wildcard certificate; the second node serves it from the log with up's cluster
secret: the same certificate on both, chaining to pebble's root)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pydstack.actors.gateway.up_launch import _leaf, dev_ca
from tests.acme.pebble import missing_binaries, running_pebble
from tests.cli.harness import PYDSTACK, Up, cli, register_busybox_image, wait_for

from .cvms import _serve, fetch
from .lan import namespace_lan
from .procs import ADMIN_PORT, NodeProc, get_json

BASE = "apps.pydstack.test"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("acme", [False, True], ids=["dev-ca", "acme"])
async def test_up_cvm_reachable_through_two_gateways(short_tmp: Path, acme: bool) -> None:
    """App URL through up's node and a second node; identical `routes --json` on both."""
    if acme and missing_binaries():
        pytest.skip("pebble not installed (Debian package pebble)")
    tmp_path = short_tmp  # wireguard-go's UAPI socket path must fit in sun_path
    home = tmp_path / "home"
    async with namespace_lan() as lan, contextlib.AsyncExitStack() as stack:
        # up's node runs in the host's namespace: its nftables guard stays out of the
        # machine's ruleset (the guard: tests/adversarial/test_gateway_forwarding.py).
        # `attest simulate` boots an app registered nowhere: the dev backend, not the log's
        # a LAN address on a host without TDX: simulated attestation beyond loopback
        extra: tuple[str, ...] = ("--listen", lan.host_ip, "--allow-simulated",
                                  "--dashboard-port", "-1",
                                  "--gateway-domain", BASE, "--kms-auth", "dev",
                                  "--no-gateway-forward-guard")  # fmt: skip
        if acme:
            peb = await stack.enter_async_context(
                running_pebble(tmp_path / "pebble", host=lan.host_ip)
            )
            extra += ("--gateway-acme-directory", peb.directory_url, "--gateway-acme-ca-bundle",
                      peb.ca_bundle, "--gateway-challtestsrv", peb.challtestsrv_url)  # fmt: skip
        plane = await asyncio.to_thread(Up(home, extra=extra).start)
        sim: subprocess.Popen[bytes] | None = None
        gw2: NodeProc | None = None
        server = None
        try:
            state = json.loads((home / "state.json").read_text())
            assert state["gateway_registration_url"].startswith(f"https://{lan.host_ip}:")
            addr2 = await lan.add("gw2")
            chain, key = _leaf(dev_ca(home / "gateway"), [f"*.{BASE}"], [])
            (tmp_path / "w.pem").write_bytes(chain)
            (tmp_path / "w.key").write_bytes(key)
            certs = ["--cert-chain", str(tmp_path / "w.pem"), "--cert-key", str(tmp_path / "w.key")]
            if acme:  # the certificate up's node orders, from the log
                certs = ["--cluster-secret", str(home / "gateway" / "cluster.secret")]
            gw2 = NodeProc("gw2", lan.ns("gw2"), addr2, [
                sys.executable, "-m", "pydstack.actors.gateway", "--nats", state["nats_url"],
                "--creds", str(home / "identities" / "gateway.nk"), "--node-id", "gw2",
                "--netns", lan.ns("gw2"), "--base-domain", BASE, "--endpoint", f"{addr2}:51820",
                "--state-dir", str(tmp_path / "gw2"), "--admin-host", "0.0.0.0",
                "--admin-port", str(ADMIN_PORT), *certs, "--log-level", "warning",
            ], tmp_path / "gw2.log")  # fmt: skip
            await gw2.start()
            if acme:  # up's node orders, gw2 (no DNS provider) serves the same from the log
                await _same_certificate(state["gateway_admin_url"], gw2.admin)

            cvm_ns = lan.ns("cvm1")
            await lan.add("cvm1")
            server = await _serve(cvm_ns, 80, "cvm1", None)
            app_id = "ab" * 20
            # the KMS serves only TDs measured as an image on its log
            image = await asyncio.to_thread(register_busybox_image, home)
            sim_log = tmp_path / "sim.log"
            env = {k: v for k, v in os.environ.items() if not k.startswith("PYDSTACK_")}
            with sim_log.open("wb") as f:
                sim = subprocess.Popen(
                    [PYDSTACK, "attest", "simulate", "--state", str(tmp_path / "sim"),
                     "--socket", str(tmp_path / "d.sock"), "--app-id", app_id,
                     "--kms", state["kms_url"], "--dev-pki", str(home / "dev-pki"),
                     "--gateway", state["gateway_registration_url"],
                     "--gateway-ca", state["gateway_ca"], "--gateway-netns", cvm_ns,
                     "--image", str(image)],
                    stdout=f, stderr=subprocess.STDOUT, env=env,
                )  # fmt: skip
            await asyncio.to_thread(
                wait_for,
                lambda: "registered with" in sim_log.read_text() or sim.poll() is not None,
                timeout=60, what="the simulated CVM to register",
            )  # fmt: skip
            assert sim.poll() is None, sim_log.read_text()
            assert "2 gateway(s)" in sim_log.read_text()

            ca_pem = await asyncio.to_thread(Path(state["gateway_ca"]).read_text)
            if acme:
                ca_pem = (await peb.root_pem()).decode()
            host, port = state["gateway_proxy"].rsplit(":", 1)
            client = lan.ns("client")
            await lan.add("client")
            served = []
            for ip, p in ((host, int(port)), (addr2, 443)):
                body, cert, deadline = b"", None, time.monotonic() + 40
                while time.monotonic() < deadline:  # the app route needs a handshake
                    try:
                        body, cert = await fetch(client, ip, f"{app_id}.{BASE}", ca_pem, port=p)
                        if body:
                            break
                    except OSError:
                        pass
                    await asyncio.sleep(0.2)
                assert body == b"cvm1|80", f"{ip}:{p}; CVM sim exit code {sim.poll()}"
                served.append(cert)
            if acme:  # one wildcard certificate, on both nodes (dev CA: a leaf per node)
                assert served[0] == served[1]

            outs = []
            for url in (state["gateway_admin_url"], f"http://{addr2}:{ADMIN_PORT}", None):
                args = ["gateway", "routes", "--json"] + (["--node-url", url] if url else [])
                r = await asyncio.to_thread(cli, home, *args)
                assert r.code == 0, r.err
                outs.append(r.out)
            assert outs[0] == outs[1] == outs[2]
            routes = json.loads(outs[0])["routes"]
            assert [r["app_id"] for r in routes] == [app_id]
        finally:
            if server is not None:
                server.close()
            if sim is not None:
                sim.terminate()
                await asyncio.to_thread(sim.wait, 10)
            if gw2 is not None:
                await gw2.stop()
            assert await asyncio.to_thread(plane.stop) == 0, plane.text()


async def _same_certificate(*admin_urls: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        statuses = [await get_json(url + "/status") for url in admin_urls]
        serving = {s["certificates"].get(BASE) for s in statuses}
        if len(serving) == 1 and None not in serving:
            return
        assert time.monotonic() < deadline, f"no common certificate: {statuses}"
        await asyncio.sleep(0.3)
