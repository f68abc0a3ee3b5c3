"""`pydstack deploy examples/hello` against `pydstack up --vmm sandbox`: the app is served over
HTTPS through up's gateway, from a sandbox CVM that got its keys from up's KMS, registered at
the gateway over RA-TLS and brought WireGuard up inside its namespace; its quote endpoint
answers a quote over the client's report_data that `pydstack attest verify` accepts; an env
var outside `allowed_envs` is dropped by the guest."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pydstack.adapters.sandbox import _netns
from pydstack.adapters.tdx.pki import DevPki
from pydstack.core.events import VmRequested, VmResources
from tests.cli.harness import Result, Up, cli, free_host_port, wait_for
from tests.deploy.support import append_as

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello" / "docker-compose.yaml"


def _get(proxy: str, url: str, ca_file: str, path: str = "/") -> tuple[int, str]:
    """GET `url`'s `path` at up's proxy address (the dev domain does not resolve), SNI = its
    host."""
    host = re.sub(r"^https://([^/:]+).*", r"\1", url)
    ctx = ssl.create_default_context(cafile=ca_file)
    addr, _, port = proxy.rpartition(":")
    with socket.create_connection((addr, int(port)), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split()[1:2]
    if not status or not status[0].isdigit():
        # The gateway closes without an answer while the CVM is registered but its app is
        # not listening yet: a connection-level failure, retried like the others.
        raise ConnectionError(f"no HTTP answer from {url}: {data[:60]!r}")
    return int(status[0]), body.decode()


def _events(home: Path, subject: str) -> list[dict[str, Any]]:
    r = cli(home, "events", "--subject", subject, "--json")
    assert r.code == 0, r.err
    return r.lines()


def _line(out: str, label: str) -> str:
    found = re.search(rf"^{label}\s+(\S+)", out, re.M)
    assert found, f"no {label!r} line in:\n{out}"
    return found.group(1)


def _ours(root: Path) -> list[int]:
    """Processes this test started that name its temp dir (supervisor, dockerds)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if str(root).encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
    return out


def _cleanup(root: Path, sandboxes: dict[str, dict[str, str]]) -> None:
    """Whatever is left: processes in the CVMs' namespaces (dockerd, wireguard-go, the app),
    the supervisor, mounts the engines left, the namespaces."""
    sandboxes = {k: v for k, v in sandboxes.items() if v["netns"]}
    for sb in sandboxes.values():
        _netns.kill_all(sb["netns"])
    for pid in _ours(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    for sb in sandboxes.values():
        _netns.unmount_under(root, Path(sb["run_dir"]))
        _netns.delete(sb["netns"])
        shutil.rmtree(sb["run_dir"], ignore_errors=True)
    _netns.unmount_under(root)


def _up_with_gateway(root: Path) -> tuple[Path, Up]:
    """`up` with the sandbox VMM and a gateway, its data dir under `root` (skips the test
    without root, dockerd and wireguard-go)."""
    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("wireguard-go"):
        pytest.skip("sandbox CVMs behind a gateway need root, dockerd and wireguard-go")
    home = root / "home"
    # The gateway runs in the host's namespace here: its nftables guard stays out of the
    # machine's ruleset (tests/adversarial/test_gateway_forwarding.py tests it in namespaces).
    plane = Up(home, extra=("--vmm", "sandbox", "--gateway", "--no-gateway-forward-guard",
                            "--dashboard-port", "-1")).start()  # fmt: skip
    return home, plane


def _deploy_example(
    home: Path, root: Path, vm_id: str, greeting: str, sandboxes: dict[str, dict[str, str]]
) -> Result:
    """`deploy` the example as `vm_id` with GREETING sealed in its env (the file under `root`);
    its sandbox goes into `sandboxes` (for the cleanup) before the deploy's success is asserted."""
    (root / "hello.env").write_text(f"GREETING={greeting}\n")
    r = cli(home, "deploy", str(EXAMPLE), "--env-file", str(root / "hello.env"),
            "--port", f"{free_host_port()}:8080", "--vm-id", vm_id,
            "--timeout", "150", timeout=200)  # fmt: skip
    sandboxes[vm_id] = _sandbox(home, vm_id)
    assert r.code == 0, r.out + r.err
    return r


def _remove_vms(home: Path, vms: list[str]) -> None:
    """`vm rm` each of `vms`, then wait for their VmRemoved (a timeout is not a failure: the
    cleanup after it kills what is left). CVMs outlive the VMM by design: this runs while the
    VMM does."""
    for vm in vms:
        cli(home, "vm", "rm", vm)
    with contextlib.suppress(AssertionError):
        for vm in vms:
            wait_for(lambda v=vm: any(e["type"] == "VmRemoved"  # type: ignore[misc]
                                      for e in _events(home, f"dstack.vm.{v}")),
                     timeout=40, what=f"{vm} removed")  # fmt: skip


@pytest.mark.timeout(400)
def test_deployed_example_is_served_over_https_through_the_gateway(short_tmp: Path) -> None:
    """deploy prints the app URL and says reachable; the page carries the app id the guest
    measured and the env var deploy sealed; its quote endpoint gives a verifiable quote over
    the client's report_data; a second instance whose sealed env holds a name outside
    allowed_envs boots with that name dropped."""
    home, plane = _up_with_gateway(short_tmp)
    sandboxes: dict[str, dict[str, str]] = {}
    vms = ["hello1", "hello2"]
    try:
        state = msgspec.json.decode((home / "state.json").read_bytes())
        proxy, ca, domain = state["gateway_proxy"], state["gateway_ca"], state["gateway_domain"]
        greeting = f"hi-{random.randrange(10**9)}"
        r = _deploy_example(home, short_tmp, "hello1", greeting, sandboxes)
        app_id, compose_hash = _line(r.out, "app id"), _line(r.out, "compose hash")
        url = _line(r.out, "url")
        assert re.fullmatch(rf"https://{app_id}-8080\.{re.escape(domain)}(:\d+)?", url), url
        assert f"reachable    {url} (HTTP 200 through the gateway)" in r.out

        status, body = _get(proxy, url, ca)
        regs = [e["body"] for e in _events(home, "dstack.*.*") if e["type"] == "CvmRegistered"
                and e["body"]["app_id"] == app_id]  # fmt: skip
        assert status == 200
        assert body.splitlines() == ["hello from pydstack", f"app {app_id}",
                                     f"instance {regs[0]['instance_id']}",
                                     f"GREETING={greeting}"]  # fmt: skip
        _check_quote(home, short_tmp, proxy, url, ca,
                     {"app_id": app_id, "compose_hash": compose_hash,
                      "instance_id": regs[0]["instance_id"]})  # fmt: skip

        # A second instance of the app, its env sealed by hand with a name the app-compose
        # does not allow (deploy refuses to seal one): the guest must drop it.
        (short_tmp / "bad.env").write_text("GREETING=second\nSNEAKY=must-not-arrive\n")
        enc = cli(home, "env", "encrypt", "--app-id", app_id, "--kms", state["kms_url"],
                  str(short_tmp / "bad.env"))  # fmt: skip
        assert enc.code == 0, enc.err
        append_as(plane, "operator", "dstack.vm.hello2", VmRequested(
            vm_id="hello2", app_id=app_id, name="hello", image="sandbox-busybox",
            compose_hash=compose_hash, encrypted_env=bytes.fromhex(enc.out.strip()),
            resources=VmResources(vcpu=1, memory_mb=256, disk_gb=1)))  # fmt: skip

        def second() -> dict[str, Any] | None:
            regs = [e["body"] for e in _events(home, "dstack.*.*")
                    if e["type"] == "CvmRegistered" and e["body"]["app_id"] == app_id]  # fmt: skip
            return regs[1] if len(regs) > 1 else None

        inst2 = wait_for(second, timeout=90, what="the second instance to register")
        sandboxes["hello2"] = _sandbox(home, "hello2")
        url2 = f"https://{inst2['instance_id']}-8080.{domain}"

        def page2() -> str:
            with contextlib.suppress(OSError):
                code, text = _get(proxy, url2, ca)
                return text if code == 200 else ""
            return ""

        body2 = wait_for(page2, timeout=60, what="the second instance to answer")
        assert body2.splitlines()[1:] == [f"app {app_id}", f"instance {inst2['instance_id']}",
                                          "GREETING=second"]  # fmt: skip
        env_stage = [e["body"]["detail"] for e in _events(home, "dstack.vm.hello2")
                     if e["type"] == "VmBootProgress" and e["body"]["stage"] == "env"]  # fmt: skip
        assert env_stage == ["exported ['GREETING']; not in allowed_envs, dropped ['SNEAKY']"]
        progress = [e["body"] for e in _events(home, "dstack.vm.hello1")
                    if e["type"] == "VmBootProgress"]  # fmt: skip
        stages = [p["stage"] for p in progress]
        # The sandbox runs on the host kernel: no dm-crypt, so no encrypted disk, and it says so.
        storage = next(p["detail"] for p in progress if p["stage"] == "storage")
        assert "no dm-crypt" in storage and "NOT encrypted" in storage, storage
        # dstack's order: keys, env, then the gateway, then docker and the app.
        assert stages.index("keys") < stages.index("env") < stages.index("gateway")
        assert stages.index("gateway") < stages.index("docker") < stages.index("app")
    finally:
        _remove_vms(home, vms)
        stopped = plane.stop()
        left = [p for sb in sandboxes.values() if sb["netns"] for p in _netns.pids(sb["netns"])]
        _cleanup(short_tmp, sandboxes)
        assert stopped == 0, plane.text()
        assert left == [], f"processes left in the CVMs' namespaces: {left}"
        tag = hashlib.sha256(str(home).encode()).hexdigest()[:8]
        gw = subprocess.run(["pgrep", "-f", f"wireguard-go -f dgw{tag}"], capture_output=True)
        assert gw.stdout == b"", "up's gateway left its wireguard-go"


def _verify(home: Path, evidence: Path, collateral: Path) -> tuple[int, dict[str, Any]]:
    """`pydstack attest verify --json` under up's dev PKI (the simulated TD signs with it)."""
    r = cli(home, "attest", "verify", str(evidence), "--collateral", str(collateral),
            "--dev-root", str(home / "dev-pki" / "root.der"), "--json")  # fmt: skip
    assert r.out.strip(), r.err
    return r.code, json.loads(r.out)


def _check_quote(home: Path, tmp: Path, proxy: str, url: str, ca: str,
                 app: dict[str, str]) -> None:  # fmt: skip
    """The app's /cgi-bin/quote, through the gateway, with report_data of our choosing: the
    agent's GetQuote JSON, which `attest verify` accepts as a quote of this app's CVM over
    exactly those bytes; the same JSON with one report_data byte changed is refused."""
    nonce = os.urandom(64)
    code, body = _get(proxy, url, ca, f"/cgi-bin/quote?report_data={nonce.hex()}")
    assert code == 200, body
    saved = tmp / "quote.json"
    saved.write_text(body)
    collateral = tmp / "collateral.json"
    collateral.write_text(DevPki.load(home / "dev-pki").collateral_json(now=int(time.time())))
    rc, report = _verify(home, saved, collateral)
    assert (rc, report["verdict"], report["reasons"]) == (0, "trusted", []), report
    assert report["event_log"]["replays"] is True
    assert report["measurements"]["report_data"] == nonce.hex()
    assert {k: report["app"][k] for k in app} == app

    doc = json.loads(body)
    quote = bytearray(bytes.fromhex(doc["quote"]))
    quote[568] ^= 0x01  # first byte of the TD report's report_data (after the 48-byte header)
    tampered = tmp / "tampered.json"
    tampered.write_text(json.dumps({**doc, "quote": quote.hex()}))
    rc, report = _verify(home, tampered, collateral)
    assert (rc, report["verdict"]) == (1, "refused"), report
    assert report["reasons"]

    code, body = _get(proxy, url, ca, "/cgi-bin/quote?report_data=not-hex")
    assert (code, body) == (400, "report_data: hex, 1 to 64 bytes\n")


def _sandbox(home: Path, vm_id: str) -> dict[str, str]:
    path = home / "vmm" / "vms" / vm_id / "sandbox.json"
    if not path.exists():
        return {"netns": "", "run_dir": ""}
    doc = msgspec.json.decode(path.read_bytes())
    return {"netns": doc["netns"], "run_dir": doc["run_dir"]}


@pytest.mark.timeout(200)
def test_host_port_to_the_agent_port_is_a_boot_error(short_tmp: Path) -> None:
    """The forwarder connects to the CVM's loopback, where the agent serves app keys on 8090:
    a port map onto it halts the boot with one VmBootError naming the port, and no restart."""
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        pytest.skip("sandbox CVMs need root and dockerd")
    home = short_tmp / "home"
    plane = Up(home, extra=("--vmm", "sandbox", "--dashboard-port", "-1")).start()
    sandboxes: dict[str, dict[str, str]] = {}
    try:
        r = cli(home, "deploy", str(EXAMPLE), "--port", f"{free_host_port()}:8090",
                "--vm-id", "agentport", "--timeout", "60", timeout=100)  # fmt: skip
        sandboxes["agentport"] = _sandbox(home, "agentport")
        assert r.code != 0, r.out
        want = "port 8090 is the guest agent's (loopback only): it cannot be forwarded"
        assert want in r.out + r.err

        def errors() -> list[dict[str, Any]]:
            return [e for e in _events(home, "dstack.vm.agentport")
                    if e["type"] in ("VmBootError", "VmStarted", "VmExited")]  # fmt: skip

        seen = wait_for(errors, timeout=20, what="the boot error")
        time.sleep(3)  # a restart loop would add VmExited/VmStarted/VmBootError by now
        seen = errors()
        assert [e["type"] for e in seen] == ["VmStarted", "VmBootError"], seen
        assert want in seen[1]["body"]["error"]
    finally:
        _remove_vms(home, ["agentport"])
        stopped = plane.stop()
        _cleanup(short_tmp, sandboxes)
        assert stopped == 0, plane.text()


@pytest.mark.timeout(400)
async def test_deployed_example_is_served_with_a_certificate_from_pebble(short_tmp: Path) -> None:
    """With `up --gateway-acme-directory` the gateway orders its wildcard certificate from a
    real ACME CA (pebble, DNS-01 through pebble-challtestsrv): deploy checks the app's URL
    against pebble's root (`--ca-file`), and the page is served under that chain, not the
    dev CA's."""
    from tests.acme.pebble import missing_binaries, running_pebble

    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("wireguard-go"):
        pytest.skip("sandbox CVMs behind a gateway need root, dockerd and wireguard-go")
    if missing_binaries():
        pytest.skip(f"pebble not installed: {missing_binaries()} (Debian package pebble)")
    home = short_tmp / "home"
    async with running_pebble(short_tmp / "pebble") as peb:
        root = short_tmp / "pebble-root.pem"
        await asyncio.to_thread(root.write_bytes, await peb.root_pem())
        plane = await asyncio.to_thread(Up(home, extra=(
            "--vmm", "sandbox", "--gateway", "--no-gateway-forward-guard", "--dashboard-port", "-1",
            "--gateway-acme-directory", peb.directory_url, "--gateway-acme-ca-bundle",
            peb.ca_bundle, "--gateway-challtestsrv", peb.challtestsrv_url)).start)  # fmt: skip
        sandboxes: dict[str, dict[str, str]] = {}
        try:
            state = msgspec.json.decode(await asyncio.to_thread((home / "state.json").read_bytes))
            r = await asyncio.to_thread(
                cli, home, "deploy", str(EXAMPLE), "--port", f"{free_host_port()}:8080",
                "--vm-id", "acme1", "--ca-file", str(root), "--timeout", "150", timeout=200,
            )  # fmt: skip
            sandboxes["acme1"] = _sandbox(home, "acme1")
            assert r.code == 0, r.out + r.err
            url = _line(r.out, "url")
            assert f"reachable    {url} (HTTP 200 through the gateway)" in r.out
            status, body = await asyncio.to_thread(_get, state["gateway_proxy"], url, str(root))
            assert status == 200 and body.startswith("hello from pydstack"), body
            with pytest.raises(ssl.SSLCertVerificationError):  # not the dev CA's certificate
                await asyncio.to_thread(_get, state["gateway_proxy"], url, state["gateway_ca"])
        finally:
            await asyncio.to_thread(_remove_vms, home, ["acme1"])
            stopped = await asyncio.to_thread(plane.stop)
            await asyncio.to_thread(_cleanup, short_tmp, sandboxes)
            assert stopped == 0, plane.text()
