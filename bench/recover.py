"""Recovery: seconds from `kill -9` of up's embedded nats-server until the plane works again,
and from a restart of `up` until its apps answer through the gateway again.

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
(b) Then `up` is stopped (SIGINT; the CVMs run on under their supervisor) and started again on
the same data dir, 3 times (1), and measured from the start:

- ``restart_reachable_s``: until every app answers HTTPS 200 through the gateway: each
  instance's URL (``<instance_id>-8080.<domain>``, the tunnel to that CVM) and the app's
  (``<app_id>-8080.<domain>``, routed only to instances with a fresh handshake), GET through
  up's proxy with the dev CA, tried every 50 ms. Goal (issue 17): <= 5 s.
- ``restart_ready_s`` (the baseline): until up says "control plane ready" (what it takes
  before it can serve anything).
- ``reregistrations``: CvmRegistered events written during the restarts (0: the restarted
  gateway handshook with the CVMs itself; they did not need to register again).

(c) Then the gateway node crashes inside `up`: its WireGuard carrier (wireguard-go) is killed
with -9, 3 times (1), and measured from the kill:

- ``gateway_heal_s``: until every app answers HTTPS 200 through the gateway again (up rebuilds
  the node in place: upkeep.KeptComponent). Goal (issue 17): <= 5 s.
- ``carrier_back_s`` (the baseline): until a new wireguard-go carries the interface (what the
  rebuild cannot beat).

Afterwards `pydstack audit` must pass, up must still run, and its output hold no traceback;
otherwise the bench exits non-zero. Last line: JSON ``{"nats_heal_s", "actors_heal_s",
"server_start_s", "restart_reachable_s", "restart_ready_s", "gateway_heal_s",
"carrier_back_s", "reregistrations", "kills", "restarts", "apps"}`` (medians; ``*_max`` the
worst kill or restart).
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
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats.errors

from bench._common import emit, median, parse_quick, remove_vms
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
REACH_LIMIT_S = 120.0  # a restart whose apps do not answer by then fails the bench


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


def _start_up(home: Path, log: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDSTACK_")}
    with log.open("ab") as f:
        return subprocess.Popen(
            [PYDSTACK, "up", "--data-dir", str(home), "--vmm", "sandbox", "--gateway",
             "--port", str(port), "--dashboard-port", "-1",
             "--metrics-port", "-1", "--log-json"],
            stdout=f, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip


def _registrations(home: Path) -> list[dict[str, Any]]:
    r = _cli(home, "events", "--subject", "dstack.cvm.*", "--json")
    return [b for x in r.stdout.splitlines() if (b := json.loads(x))["type"] == "CvmRegistered"]


def _app_hosts(home: Path) -> list[str]:
    """The names to reach: every registered instance's and every app's, on port 8080."""
    domain = _state(home)["gateway_domain"]
    regs = [e["body"] for e in _registrations(home)]
    ids = sorted({r["instance_id"] for r in regs}) + sorted({r["app_id"] for r in regs})
    return [f"{i}-8080.{domain}" for i in ids]


def _https_status(proxy: str, host: str, ctx: ssl.SSLContext) -> int:
    """GET / of `host` at up's proxy address (SNI = host); the status, 0 on any failure."""
    addr, _, port = proxy.rpartition(":")
    try:
        with socket.create_connection((addr, int(port)), timeout=2) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                head = s.recv(64).split()
    except OSError:
        return 0
    return int(head[1]) if len(head) > 1 and head[1].isdigit() else 0


def _restart_and_reach(
    home: Path, log: Path, ups: list[subprocess.Popen[bytes]], port: int, hosts: list[str]
) -> dict[str, float]:
    """Stop up (``ups[-1]``), start it again (appended to ``ups``: the caller stops the last
    one whatever happens); seconds until it is ready and until every host answers 200."""
    ups[-1].send_signal(signal.SIGINT)
    if ups[-1].wait(timeout=60) != 0:
        raise SystemExit(f"pydstack up exited with {ups[-1].returncode} when stopped")
    mark = len(log.read_text(errors="replace"))
    t0 = time.monotonic()
    ups.append(up := _start_up(home, log, port))
    got: dict[str, float] = {}
    ctx: ssl.SSLContext | None = None
    waiting = list(hosts)
    while time.monotonic() - t0 < REACH_LIMIT_S:
        if up.poll() is not None:
            raise SystemExit(f"pydstack up exited after the restart:\n{log.read_text()[-2000:]}")
        if "restart_ready_s" not in got and "control plane ready" in log.read_text()[mark:]:
            got["restart_ready_s"] = time.monotonic() - t0
            state = _state(home)
            ctx = ssl.create_default_context(cafile=state["gateway_ca"])
        if ctx is not None:
            proxy = str(_state(home)["gateway_proxy"])
            waiting = [h for h in waiting if _https_status(proxy, h, ctx) != 200]
            if not waiting:
                got["restart_reachable_s"] = time.monotonic() - t0
                return got
        time.sleep(0.05)
    raise SystemExit(f"not every app answered within {REACH_LIMIT_S:.0f} s of the restart: "
                     f"{waiting} still did not ({got})")  # fmt: skip


def _carrier(home: Path) -> list[int]:
    """The pid of up's gateway's wireguard-go (its interface is named after the data dir)."""
    tag = hashlib.sha256(str(home).encode()).hexdigest()[:8]
    out = subprocess.run(["pgrep", "-f", f"wireguard-go -f dgw{tag}$"], capture_output=True,
                         text=True).stdout  # fmt: skip
    return [int(p) for p in out.split()]


def _crash_gateway_and_reach(
    home: Path, up: subprocess.Popen[bytes], hosts: list[str]
) -> dict[str, float]:
    """kill -9 of the gateway's wireguard-go; seconds until a new one runs and until every
    host answers 200 through the proxy again."""
    [old] = _carrier(home)
    state = _state(home)
    ctx = ssl.create_default_context(cafile=state["gateway_ca"])
    proxy = str(state["gateway_proxy"])
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    got: dict[str, float] = {}
    waiting = list(hosts)
    while time.monotonic() - t0 < REACH_LIMIT_S:
        if up.poll() is not None:
            raise SystemExit(f"pydstack up exited after the gateway crash ({up.returncode})")
        if "carrier_back_s" not in got and _carrier(home) not in ([], [old]):
            got["carrier_back_s"] = time.monotonic() - t0
        if "carrier_back_s" in got:
            waiting = [h for h in waiting if _https_status(proxy, h, ctx) != 200]
            if not waiting:
                got["gateway_heal_s"] = time.monotonic() - t0
                return got
        time.sleep(0.05)
    raise SystemExit(f"not every app answered within {REACH_LIMIT_S:.0f} s of the gateway "
                     f"crash: {waiting} still did not ({got})")  # fmt: skip


def main(quick: bool) -> None:
    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("wireguard-go"):
        raise SystemExit("bench.recover needs root, dockerd (docker.io) and wireguard-go")
    apps, kills = (1, 1) if quick else (3, 3)  # up gives up at the 4th crash within 60 s
    restarts = kills
    root = Path(tempfile.mkdtemp(prefix="pdr-", dir="/tmp"))  # short: UAPI socket paths
    home, log = root / "home", root / "up.log"
    port = free_port()
    ups = [_start_up(home, log, port)]
    vms: list[str] = []
    runs: list[dict[str, float]] = []
    reruns: list[dict[str, float]] = []
    reregistrations = 0
    crashes: list[dict[str, float]] = []
    try:
        _wait_ready(home, ups[0], log)
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
        if (code := ups[-1].poll()) is not None:
            raise SystemExit(f"pydstack up exited ({code}):\n{log.read_text()[-2000:]}")
        hosts = _app_hosts(home)
        registered = len(_registrations(home))
        for k in range(restarts):
            rerun = _restart_and_reach(home, log, ups, port, hosts)
            reruns.append(rerun)
            print(f"restart {k + 1}: up ready {rerun['restart_ready_s']:.2f} s, every app "
                  f"({len(hosts)} names) answering through the gateway "
                  f"{rerun['restart_reachable_s']:.2f} s", flush=True)  # fmt: skip
        for k in range(kills):
            time.sleep(1.0)  # the rebuilt node's peers handshook; its budget window is 60 s
            crashes.append(_crash_gateway_and_reach(home, ups[-1], hosts))
            print(f"gateway crash {k + 1}: new wireguard-go {crashes[-1]['carrier_back_s']:.2f} "
                  f"s, every app answering {crashes[-1]['gateway_heal_s']:.2f} s",
                  flush=True)  # fmt: skip
        reregistrations = len(_registrations(home)) - registered
        audit = _cli(home, "audit")
        if audit.returncode != 0:
            raise SystemExit(f"audit failed after the kills and restarts:\n{audit.stdout[-2000:]}")
        print(audit.stdout.strip().splitlines()[-1], flush=True)
    finally:
        remove_vms(_cli, home, vms)
        ups[-1].send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            ups[-1].wait(timeout=60)
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
    reach = [r["restart_reachable_s"] for r in reruns]
    ready = [r["restart_ready_s"] for r in reruns]
    print(f"stop and start up: every app answers through the gateway after median "
          f"{median(reach):.2f} s (worst {max(reach):.2f}; goal <= 5), up ready after "
          f"{median(ready):.2f} s; CVMs that registered again: {reregistrations}",
          flush=True)  # fmt: skip
    gw_heal = [c["gateway_heal_s"] for c in crashes]
    carrier = [c["carrier_back_s"] for c in crashes]
    print(f"kill -9 of the gateway's wireguard-go: every app answers again after median "
          f"{median(gw_heal):.2f} s (worst {max(gw_heal):.2f}; goal <= 5), a new wireguard-go "
          f"after {median(carrier):.2f} s", flush=True)  # fmt: skip
    emit({"nats_heal_s": median(heal), "nats_heal_s_max": max(heal),
          "gateway_heal_s": median(gw_heal), "gateway_heal_s_max": max(gw_heal),
          "carrier_back_s": median(carrier),
          "actors_heal_s": median(actors), "actors_heal_s_max": max(actors),
          "server_start_s": median(start), "restart_reachable_s": median(reach),
          "restart_reachable_s_max": max(reach), "restart_ready_s": median(ready),
          "reregistrations": reregistrations, "kills": kills, "restarts": restarts,
          "apps": apps})  # fmt: skip


if __name__ == "__main__":
    main(parse_quick(__doc__))
