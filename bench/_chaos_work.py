"""The traffic of bench.chaos: what it wrote and got acknowledged, the workload of short-lived
apps (deploy, upgrade, remove through the CLI) and the probe writer (appends on a connection
of its own), with the failures each met and whether a fault explains them.

    soak = Soak(root, hosts, cluster.url, client_ns, rng)
    await asyncio.gather(workload(soak, end), writer(soak, end))
    soak.acked     # [(subject, type)] every write a writer was told is done
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors

from bench._chaos_procs import HostProc
from pydstack.adapters.nats import NEW, EventStore, StoreError, StreamSettings
from pydstack.adapters.nats.identity import IdentityStore
from pydstack.core.events import AppRegistered, subject
from tests.cli.harness import Result, cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hello" / "docker-compose.yaml"
CHURN_MAX = 2  # short-lived apps alive at once (the machine is small)


@dataclass
class Soak:
    root: Path
    hosts: dict[str, HostProc]
    nats: str
    client_ns: str
    rng: random.Random
    t0: float = 0.0
    stopping: bool = False
    probes: list[tuple[float, bool, bool]] = field(default_factory=list)  # (t, gwa, gwb)
    acked: list[tuple[str, str]] = field(default_factory=list)  # (subject, event type)
    failures: list[dict[str, Any]] = field(default_factory=list)
    windows: list[tuple[float, float]] = field(default_factory=list)  # faults, with grace
    faults: list[dict[str, Any]] = field(default_factory=list)
    deployed: set[str] = field(default_factory=set)
    churn: dict[str, str] = field(default_factory=dict)  # live short-lived vm -> app id
    upgrades: int = 0
    removes: int = 0
    appends: int = 0
    appends_failed: int = 0
    append_results: list[tuple[float, bool]] = field(default_factory=list)  # (t, acked)
    injecting_since: float | None = None  # a fault is being injected since

    def in_fault(self, start: float, end: float) -> bool:
        """A fault was being injected, or was active (until GRACE after it healed), at some
        time during [start, end]."""
        if self.injecting_since is not None and self.injecting_since <= end:
            return True
        return any(s <= end and start <= e for s, e in self.windows)

    def failed(self, what: str, start: float, r: Result | None, error: str = "") -> None:
        text = (r.err or r.out).strip() if r else error
        explained = "Traceback" not in text and self.in_fault(start, time.monotonic())
        self.failures.append({"t_s": round(start - self.t0, 1), "what": what,
                              "explained": explained, "error": text[-300:]})  # fmt: skip
        print(f"{'explained' if explained else 'UNEXPLAINED'} failure: {what}: "
              f"{text[-200:]}", flush=True)  # fmt: skip

    def unexplained(self) -> int:
        return sum(not f["explained"] for f in self.failures)

    def cli(self, *args: str, timeout: float = 90) -> Result:
        return cli(self.hosts["ha"].home, "--nats", self.nats, *args, timeout=timeout)

    def deploy(self, compose_dir: Path, vm: str, host: str) -> str | None:
        """Deploy examples/hello from `compose_dir` (its name: the app's) as VM `vm` pinned to
        `host`, without waiting; the app id, None if it failed (noted)."""
        compose = compose_dir / "docker-compose.yaml"
        if not compose.exists():
            compose_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(EXAMPLE, compose)
        start = time.monotonic()
        r = self.cli("deploy", str(compose), "--vm-id", vm, "--host", host, "--no-wait",
                     "--image", "sandbox-busybox", "--memory", "256M", "--disk", "1G")  # fmt: skip
        found = re.search(r"^app id\s+(\S+)", r.out, re.M)
        if r.code or not found:
            self.failed(f"deploy {vm} on {host}", start, r)
            return None
        self.acked.append((f"dstack.vm.{vm}", "VmRequested"))
        self.deployed.add(vm)
        return found.group(1)

    def upgrade(self, vm: str, app_id: str) -> None:
        """`app upgrade` with a new revision of the app's compose (a changed environment)."""
        compose = self.root / vm / "docker-compose.yaml"
        self.upgrades += 1
        text = EXAMPLE.read_text().replace(
            "      - GREETING\n", f"      - GREETING\n      - CHAOS_REV={self.upgrades}\n"
        )
        compose.write_text(text)
        start = time.monotonic()
        r = self.cli("app", "upgrade", app_id, str(compose))
        if r.code:
            self.failed(f"upgrade {app_id[:12]} ({vm})", start, r)
            return
        self.acked.append((f"dstack.app.{app_id}", "AppUpgraded"))

    def remove(self, vm: str) -> None:
        start = time.monotonic()
        r = self.cli("vm", "rm", vm)
        if r.code:
            self.failed(f"vm rm {vm}", start, r)
            return
        self.removes += 1
        self.churn.pop(vm, None)
        self.acked.append((f"dstack.vm.{vm}", "VmRemoveRequested"))

    def wait_ready(self, vms: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.cli("events", "--subject", "dstack.vm.*", "--json")
            if vms <= self.booted(r.lines()):
                return
            time.sleep(1)
        raise SystemExit(f"VMs {sorted(vms)} did not boot within {timeout:.0f} s")

    @staticmethod
    def booted(events: list[dict[str, Any]]) -> set[str]:
        return {(e.get("body") or {}).get("vm_id", "") for e in events
                if e["type"] == "VmBootProgress" and e["body"].get("stage") == "ready"}  # fmt: skip

    def outages(self, which: int) -> list[tuple[float, float]]:
        """(start s since the soak's start, seconds) of each run of probe rounds that failed
        through gateway `which` (0: gwa, 1: gwb, 2: both at once)."""
        out: list[tuple[float, float]] = []
        since: float | None = None
        for t, a, b in self.probes:
            ok = (a, b, a or b)[which]
            if ok and since is not None:
                out.append((round(since - self.t0, 1), round(t - since, 1)))
                since = None
            elif not ok and since is None:
                since = t
        if since is not None:
            out.append((round(since - self.t0, 1), round(self.probes[-1][0] - since, 1)))
        return out

    def append_gaps(self) -> list[tuple[float, float]]:
        """(start s since the soak's start, seconds) from each first failed append to the
        next acknowledged one."""
        out: list[tuple[float, float]] = []
        since: float | None = None
        for t, ok in self.append_results:
            if ok and since is not None:
                out.append((round(since - self.t0, 1), round(t - since, 1)))
                since = None
            elif not ok and since is None:
                since = t
        return out

    def max_outage(self) -> float:
        """The longest run of probe rounds no gateway answered, in seconds."""
        return max((d for _, d in self.outages(2)), default=0.0)


async def workload(soak: Soak, end: float) -> None:
    """One operation every 3-6 s: deploy while fewer than CHURN_MAX short-lived apps run,
    else upgrade or remove one of them."""
    n = 0
    while not soak.stopping and time.monotonic() < end:
        await asyncio.sleep(soak.rng.uniform(3, 6))
        if soak.stopping:
            return
        if len(soak.churn) < CHURN_MAX:
            n += 1
            vm, host = f"c{n}", soak.rng.choice(["ha", "hb"])
            app_id = await asyncio.to_thread(soak.deploy, soak.root / vm, vm, host)
            if app_id:
                soak.churn[vm] = app_id
        else:
            vm = soak.rng.choice(sorted(soak.churn))
            if soak.rng.random() < 0.5:
                await asyncio.to_thread(soak.upgrade, vm, soak.churn[vm])
            else:
                await asyncio.to_thread(soak.remove, vm)


async def writer(soak: Soak, end: float) -> None:
    """An operator appending one event every 0.5 s on a connection of its own (nats-py
    reconnects it); each acknowledged append must be on the log afterwards."""
    ids = IdentityStore(soak.hosts["ha"].home / "identities")
    op = ids.load("operator")
    assert op is not None
    store = await EventStore.connect(soak.nats, op.signer, nkey_seed=op.seed,
                                     settings=StreamSettings(), name="chaos-writer",
                                     anchor=ids.anchor())  # fmt: skip
    store.timeout, store.retries = 2.0, 0
    try:
        while not soak.stopping and time.monotonic() < end:
            soak.appends += 1
            raw = json.dumps({"manifest_version": 2, "runner": "docker-compose",
                              "name": f"chaos-{soak.appends}-{os.getpid()}"}).encode()  # fmt: skip
            digest = hashlib.sha256(raw).hexdigest()
            app = AppRegistered(app_id=digest[:40], compose_hash=digest, name="chaos", compose=raw)
            subj = subject("app", app.app_id)
            start = time.monotonic()
            try:
                await store.append(subj, [app], NEW)
                soak.acked.append((subj, "AppRegistered"))
                soak.append_results.append((start, True))
            except (StoreError, nats.errors.Error, OSError, TimeoutError) as exc:
                soak.appends_failed += 1
                soak.append_results.append((start, False))
                soak.failed(f"append {soak.appends}", start, None, f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - start)))
    finally:
        await store.close()
