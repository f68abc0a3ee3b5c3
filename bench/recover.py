"""Recovery: seconds from `kill -9` of up's embedded nats-server until the plane works again.

    python -m bench.recover [--quick]     # needs root, dockerd and wireguard-go

Runs `pydstack up --vmm sandbox --gateway` in a temp data dir, deploys examples/hello 3 times
(1 with --quick), then kills up's nats-server (the pid in state.json) 3 times (1), each time
after the plane has healed from the last, and measures from the kill:

- ``nats_heal_s``: until an append succeeds again (a fresh operator connection appending an
  AppRegistered, tried every 50 ms). Goal (issue 17): <= 5 s.
- ``actors_heal_s``: until every actor of up works again: each durable consumer (scheduler,
  the host's VMM) has a pull request of its runner waiting on the restarted server (those live
  in the server's memory only, so only a runner that reconnected makes one), and the gateway
  node has folded the log past that append (its admin /status ``seq``). The KMS follows no
  log: it reads the log per request, on a connection that reconnects the same way.

The baseline is nats-server itself: ``server_start_s``, from the kill until the restarted
server accepts connections (what `up` cannot do faster than its backoff + the server's start;
the kills fall within one 60 s window, so the backoff doubles: 0.25, 0.5, 1 s).
Afterwards `pydstack audit` must pass, up must still run, and its output hold no traceback;
otherwise the bench exits non-zero. Last line: JSON ``{"nats_heal_s", "actors_heal_s",
"server_start_s", "kills", "apps"}`` (medians; ``*_max`` the worst kill).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats.errors

from bench._common import emit, median, parse_quick
from bench.deploy import PYDSTACK, _cli, _deploy, _kill_under, _wait_ready
from pydstack.adapters.nats import (
    NEW,
    ConflictError,
    EventStore,
    StoreError,
    StreamSettings,
    free_port,
)
from pydstack.adapters.nats.identity import IdentityStore
from pydstack.core.events import AppRegistered, subject

HEAL_LIMIT_S = 60.0  # a kill not healed by then fails the bench


def _state(home: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads((home / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return state


def _accepting(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Probe:
    """Connections of the bench itself: an operator that appends, the admin that reads
    consumer state."""

    def __init__(self, home: Path) -> None:
        ids = IdentityStore(home / "identities")
        self.operator, self.admin = ids.load("operator"), ids.load("admin")
        self.anchor = ids.anchor()
        self.url = str(_state(home)["nats_url"])
        self.n = 0

    async def _connect(self, role: str) -> EventStore:
        ident = self.operator if role == "operator" else self.admin
        assert ident is not None
        store = await EventStore.connect(self.url, ident.signer, nkey_seed=ident.seed,
                                         settings=StreamSettings(), name=f"bench-{role}",
                                         connect_timeout=0.5, reconnect=False,
                                         anchor=self.anchor)  # fmt: skip
        store.timeout, store.retries = 1.0, 0
        return store

    async def append(self) -> int | None:
        """One probe append on a fresh connection; its sequence, or None if it failed."""
        self.n += 1
        raw = json.dumps({"manifest_version": 2, "name": f"recover-probe-{self.n}-{os.getpid()}",
                          "runner": "docker-compose"}).encode()  # fmt: skip
        digest = hashlib.sha256(raw).hexdigest()
        app = AppRegistered(app_id=digest[:40], compose_hash=digest, name="probe", compose=raw)
        try:
            async with await self._connect("operator") as store:
                try:
                    return (await store.append(subject("app", app.app_id), [app], NEW)).seq
                except ConflictError:  # an earlier try of this probe landed after all
                    last = await store.last_by_subject(subject("app", app.app_id))
                    return last.seq if last else None
        except (StoreError, nats.errors.Error, OSError, TimeoutError):
            return None

    async def consumers_pulling(self, names: list[str]) -> bool:
        try:
            async with await self._connect("admin") as store:
                for name in names:
                    info = await store.js.consumer_info(store.stream, name, timeout=1.0)
                    if not info.num_waiting:
                        return False
        except (StoreError, nats.errors.Error, OSError, TimeoutError):
            return False
        return True

    async def consumers(self) -> list[str]:
        async with await self._connect("admin") as store:
            return [c.name for c in await store.js.consumers_info(store.stream)]


def _gateway_seq(home: Path) -> int:
    url = _state(home).get("gateway_admin_url")
    if not url:
        return -1
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=1) as r:
            return int(json.loads(r.read())["seq"])
    except (OSError, ValueError, KeyError):
        return -1


async def _kill_and_heal(home: Path, probe: Probe, consumers: list[str]) -> dict[str, float]:
    state = _state(home)
    pid, port = int(state["nats_pid"]), int(str(state["nats_url"]).rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    got: dict[str, float] = {}
    seq: int | None = None
    while time.monotonic() - t0 < HEAL_LIMIT_S:
        now = time.monotonic() - t0
        if "server_start_s" not in got and _state(home).get("nats_pid") not in (None, pid):
            if await asyncio.to_thread(_accepting, port):
                got["server_start_s"] = now
        if seq is None and "server_start_s" in got:
            seq = await probe.append()
            if seq is not None:
                got["nats_heal_s"] = time.monotonic() - t0
        if seq is not None and "actors_heal_s" not in got:
            gw = await asyncio.to_thread(_gateway_seq, home)
            if gw >= seq and await probe.consumers_pulling(consumers):
                got["actors_heal_s"] = time.monotonic() - t0
                return got
        await asyncio.sleep(0.05)
    raise SystemExit(f"not healed within {HEAL_LIMIT_S:.0f} s of the kill: reached {got}")


def main(quick: bool) -> None:
    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("wireguard-go"):
        raise SystemExit("bench.recover needs root, dockerd (docker.io) and wireguard-go")
    apps, kills = (1, 1) if quick else (3, 3)  # up gives up at the 4th crash within 60 s
    root = Path(tempfile.mkdtemp(prefix="pdr-", dir="/tmp"))  # short: UAPI socket paths
    home, log = root / "home", root / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDSTACK_")}
    with log.open("wb") as f:
        up = subprocess.Popen(
            [PYDSTACK, "up", "--data-dir", str(home), "--vmm", "sandbox", "--gateway",
             "--port", str(free_port()), "--dashboard-port", "-1",
             "--metrics-port", "-1", "--log-json"],
            stdout=f, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    vms: list[str] = []
    runs: list[dict[str, float]] = []
    try:
        _wait_ready(home, up, log)
        for i in range(apps):
            vms.append(f"rec{i}")
            print(f"rec{i}: deployed in {_deploy(home, vms[-1]):.1f} s", flush=True)
        probe = Probe(home)
        consumers = asyncio.run(probe.consumers())
        for k in range(kills):
            run = asyncio.run(_kill_and_heal(home, probe, consumers))
            runs.append(run)
            print(f"kill {k + 1}: server accepting {run['server_start_s']:.2f} s, appends "
                  f"{run['nats_heal_s']:.2f} s, every actor ({', '.join(consumers)}, gateway) "
                  f"{run['actors_heal_s']:.2f} s", flush=True)  # fmt: skip
        if up.poll() is not None:
            raise SystemExit(f"pydstack up exited ({up.returncode}):\n{log.read_text()[-2000:]}")
        audit = _cli(home, "audit")
        if audit.returncode != 0:
            raise SystemExit(f"audit failed after the kills:\n{audit.stdout[-2000:]}")
        print(audit.stdout.strip().splitlines()[-1], flush=True)
    finally:
        for vm in vms:
            _cli(home, "vm", "rm", vm, timeout=60)
        deadline = time.monotonic() + 60
        while vms and time.monotonic() < deadline:  # CVMs outlive the VMM: wait for removal
            r = _cli(home, "events", "--subject", "dstack.vm.*", "--json")
            if sum('"VmRemoved"' in x for x in r.stdout.splitlines()) >= len(vms):
                break
            time.sleep(0.5)
        up.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            up.wait(timeout=60)
        text = log.read_text(errors="replace")
        _kill_under(root)  # the CVMs' supervisor outlives up by design
        shutil.rmtree(root, ignore_errors=True)
    if "Traceback" in text:
        raise SystemExit(
            "a traceback reached up's output:\n" + text[text.index("Traceback") :][:2000]
        )
    heal = [r["nats_heal_s"] for r in runs]
    actors = [r["actors_heal_s"] for r in runs]
    start = [r["server_start_s"] for r in runs]
    print(f"kill -9 nats-server: appends again after median {median(heal):.2f} s (worst "
          f"{max(heal):.2f}; goal <= 5), every actor after {median(actors):.2f} s; the "
          f"restarted server accepted after {median(start):.2f} s", flush=True)  # fmt: skip
    emit({"nats_heal_s": median(heal), "nats_heal_s_max": max(heal),
          "actors_heal_s": median(actors), "actors_heal_s_max": max(actors),
          "server_start_s": median(start), "kills": kills, "apps": apps})  # fmt: skip


if __name__ == "__main__":
    main(parse_quick(__doc__))
