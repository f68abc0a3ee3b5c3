"""Gateway nodes as real processes (``python -m pydstack.actors.gateway``) in LAN namespaces,
and reading their admin endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from pydstack.adapters.nats.identity import Identity
from pydstack.adapters.secretfile import write_secret

ADMIN_PORT = 8080
REG_PORT = 8011
WG_PORT = 51820


@dataclass
class NodeProc:
    node_id: str
    netns: str
    address: str  # underlay
    argv: list[str]
    log: Path
    proc: asyncio.subprocess.Process | None = None
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def admin(self) -> str:
        return f"http://{self.address}:{ADMIN_PORT}"

    @property
    def registration_url(self) -> str:
        return f"https://{self.address}:{REG_PORT}"

    async def start(self, timeout: float = 30.0) -> None:
        out = self.log.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdout=asyncio.subprocess.PIPE, stderr=out, start_new_session=True
            )
        finally:
            out.close()
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    tail = self.log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{self.node_id} exited before ready:\n{tail}")
                if line.startswith(b"GATEWAY_READY "):
                    self.ready = json.loads(line.split(b" ", 1)[1])
                    return

    def kill9(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(15):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    async def status(self) -> dict[str, Any]:
        return await get_json(self.admin + "/status")


async def get_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.get(url) as resp:
            resp.raise_for_status()
            out: dict[str, Any] = await resp.json()
            return out


def _creds(path: Path, node_id: str) -> Path:
    """A gateway identity's seed file (the node signs with it, never with a random key)."""
    if not path.exists():
        write_secret(path, Identity.generate(f"gateway-{node_id}", "gateway").seed + "\n")
    return path


def node_argv(
    node_id: str,
    netns: str,
    address: str,
    *,
    nats_url: str,
    state_dir: Path,
    base_domain: str,
    tunnel_net: str,
    client_range: str,
    tunnel_ip: str,
    files: dict[str, Path] | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    argv = [
        sys.executable, "-m", "pydstack.actors.gateway", "--nats", nats_url,
        "--node-id", node_id, "--netns", netns, "--base-domain", base_domain,
        "--endpoint", f"{address}:{WG_PORT}", "--listen-port", str(WG_PORT),
        "--state-dir", str(state_dir), "--proxy-port", "443", "--admin-host", "0.0.0.0",
        "--admin-port", str(ADMIN_PORT), "--tunnel-net", tunnel_net,
        "--address-plan", client_range, "--tunnel-ip", tunnel_ip,
        "--url", f"https://{address}:{REG_PORT}", "--log-level", "warning",
        "--creds", str(_creds(state_dir.parent / f"{node_id}.nk", node_id)),
    ]  # fmt: skip
    if files and "chain" in files:  # without: certificates come from elsewhere (ACME)
        argv += ["--cert-chain", str(files["chain"]), "--cert-key", str(files["key"])]
    if files:
        argv += [
            "--registration-port", str(REG_PORT), "--tls-chain", str(files["tls_chain"]),
            "--tls-key", str(files["tls_key"]), "--client-ca", str(files["client_ca"]),
            "--dev-pki", str(files["dev_pki"]),
        ]  # fmt: skip
    return argv + list(extra)


async def wait_identical(
    nodes: list[NodeProc], *, min_peers: int, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Poll every node's status until all serve one table digest, each device holds exactly
    the table's peers, and there are at least ``min_peers``; returns the statuses."""
    deadline = time.monotonic() + timeout
    last: list[dict[str, Any]] = []
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            last = list(await asyncio.gather(*(n.status() for n in nodes)))
            digests = {s["table_digest"] for s in last}
            devices = {s["device_peer_digest"] for s in last}
            if (
                len(digests) == 1
                and len(devices) == 1
                and all(s["in_sync"] and s["peers"] >= min_peers for s in last)
            ):
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"nodes did not converge in {timeout}s: {last}")
        await asyncio.sleep(0.1)
