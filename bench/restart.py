"""`up` restart with a short log against a long one: seconds from start to "control plane ready".

    python -m bench.restart [--quick]    # 10k vs 1M events; --quick: 10k vs 100k

One `pydstack up` data dir (sandbox VMM, no gateway, a KMS and the dashboard, as `make up`)
is started once, stopped, then its stream is filled with realistic VM lifecycles (the
``bench.replay`` workload: 200 hosts joining, VMs requested, placed, booted, some stopped;
each event signed by the identity whose role writes it: operator, scheduler or vmm of this
data dir) up to the small size, `up` is started and timed to its ready line, stopped, the
stream filled up to the large size, and `up` timed again. The fill is not timed. Every actor
folds the whole stream at start today (checkpointed actors are issue 18 item 1): the ratio
shows how start-up grows with the log. Goal: ``ratio`` (large / small) <= 1.5 and
``ready_s_large`` <= 3 s (for 1M events). Last line: JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import emit
from bench.replay import T0, workload
from pydstack.adapters.nats import EventStore, NatsServer, NatsServerConfig, StreamSettings
from pydstack.adapters.nats.identity import IdentityStore, nats_users
from pydstack.adapters.ports import free_port
from pydstack.controlplane import STANDARD_IDENTITIES, default_host_id
from pydstack.core.events import (
    Event,
    Signer,
    VmRequested,
    VmScheduled,
    VmStopRequested,
    message_hash,
    seal,
)
from pydstack.core.policy import Keyring

PYDSTACK = str(Path(sys.executable).parent / "pydstack")


def _role(event: Event) -> str:
    """Which identity of the data dir writes an event of this kind."""
    if isinstance(event, VmRequested | VmStopRequested):
        return "operator"
    if isinstance(event, VmScheduled):
        return "scheduler"
    return "vmm"  # host joins and heartbeats, VM starts, boot stages, exits


def _up(home: Path, log: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDSTACK_")}
    with log.open("ab") as f:
        return subprocess.Popen(
            [PYDSTACK, "up", "--data-dir", str(home), "--vmm", "sandbox", "--no-gateway",
             "--port", str(port), "--kms-port", "0", "--dashboard-port", "0",
             "--metrics-port", "-1", "--log-json"],
            stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip


def _ready_s(home: Path, port: int, timeout_s: float) -> float:
    """Start `up`, return seconds until its ready line, stop it (SIGTERM, then wait)."""
    log = home.parent / f"up-{time.time_ns()}.log"
    t = time.monotonic()
    proc = _up(home, log, port)
    try:
        while "control plane ready" not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                raise SystemExit(f"pydstack up exited:\n{log.read_text()[-2000:]}")
            if time.monotonic() - t > timeout_s:
                raise SystemExit(f"pydstack up not ready within {timeout_s:.0f} s")
            time.sleep(0.05)
        return time.monotonic() - t
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def fill(home: Path, port: int, start: int, upto: int) -> int:
    """Append workload events ``start``..``upto`` (not timed) through the data dir's own
    nats-server, started alone as `up` starts it; returns the stream's last seq."""
    store_ids = IdentityStore(home / "identities")
    ids = store_ids.ensure_all(STANDARD_IDENTITIES)  # `up` made them: loaded, not made
    signers = {role: ids[role].signer for role in ("operator", "scheduler", "vmm")}
    admin = ids["admin"]
    users = nats_users(Keyring(), ids.values(), StreamSettings().name, default_host_id())
    server = NatsServer(NatsServerConfig(data_dir=home / "nats", host="127.0.0.1", port=port,
                                         users=users))  # fmt: skip
    async with server:
        store = await EventStore.connect(server.url, admin.signer, nkey_seed=admin.seed,
                                         name="bench-fill", anchor=store_ids.anchor())  # fmt: skip
        async with store:
            return await _publish(store, signers, start, upto)


async def _publish(store: EventStore, signers: dict[str, Signer], start: int, upto: int) -> int:
    """Seal and publish events start..upto (pipelined); the last seq."""
    js = store.nc.jetstream(timeout=30, publish_async_max_pending=8_000)
    heads: dict[str, bytes] = {}
    futs = []
    for i, (subj, event) in enumerate(workload(upto)):
        if i >= upto:
            break
        data = seal(signers[_role(event)], event, subject=subj, event_id=f"f{i:031x}",
                    time_ns=T0 + i, correlation=f"c{i // 8}",
                    prev=heads.get(subj, b""))  # fmt: skip
        heads[subj] = message_hash(data)
        if i < start:
            continue  # appended by an earlier fill: only its chain head is needed
        futs.append(await js.publish_async(subj, data))
        if len(futs) >= 20_000:
            await asyncio.gather(*futs)
            futs.clear()
    await asyncio.gather(*futs)
    return await store.last_seq()


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10k vs 100k events")
    ap.add_argument("--small", type=int, help="events of the short log [10000]")
    ap.add_argument("--large", type=int, help="events of the long log [1M; --quick 100k]")
    a = ap.parse_args()
    small, large = a.small or 10_000, a.large or (100_000 if a.quick else 1_000_000)
    result: dict[str, Any] = {"events_small": small, "events_large": large}
    with tempfile.TemporaryDirectory(prefix="pydstack-bench-restart-") as d:
        home = Path(d) / "home"
        port = free_port()
        base_s = _ready_s(home, port, 300)  # first start: identities, stream, sandbox image
        print(f"first start {base_s:.1f} s (not compared: it builds the data dir)", flush=True)
        empty_s = _ready_s(home, port, 300)
        seq = asyncio.run(fill(home, port, 0, small))
        print(f"filled to {seq} events", flush=True)
        result["ready_s_empty"] = empty_s
        result["ready_s_small"] = _ready_s(home, port, 300)
        seq = asyncio.run(fill(home, port, small, large))
        print(f"filled to {seq} events", flush=True)
        result["ready_s_large"] = _ready_s(home, port, 1800)
    result["ratio"] = result["ready_s_large"] / result["ready_s_small"]
    result.update(goal_ratio=1.5, goal_ready_s_large=3.0, cpus=os.cpu_count(),
                  loadavg_1m=os.getloadavg()[0])  # fmt: skip
    print(f"up ready: empty log {result['ready_s_empty']:.2f} s, {small} events "
          f"{result['ready_s_small']:.2f} s, {large} events {result['ready_s_large']:.2f} s: "
          f"ratio {result['ratio']:.2f} (goal <= 1.5)")  # fmt: skip
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
