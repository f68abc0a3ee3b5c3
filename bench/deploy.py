"""Deploy: seconds from `pydstack deploy` to the first HTTPS 200 through the gateway (sandbox).

    python -m bench.deploy [--quick]     # needs root, dockerd and wireguard-go

Runs `pydstack up --vmm sandbox` (KMS, gateway, VMM) in a temp data dir, then deploys
examples/hello N times (a new app each time: its own app id, keys, CVM, gateway route) with
`pydstack deploy --json`, which returns once an HTTPS GET through up's gateway answered. The
first deploy also imports the busybox image and is reported apart (``first_deploy_s``).

Where the time goes, from the log's own clocks: ``in_cvm_s`` is VmStarted -> the guest's
"ready" stage (simulated TD measurements, KMS keys, env, gateway registration, WireGuard,
dockerd and the app container); everything else of the end-to-end time (CLI start, the
deploy's appends, scheduling, the VMM's work dir and supervisor spawn, noticing "ready", the
route reaching the gateway, the HTTPS check) is the control plane: ``control_plane_share`` =
1 - in_cvm_s / deploy_s. The baseline is the CVM itself: what the platform adds around it.
Goal (issue 8): deploy <= 10 s end to end. Last line: JSON
``{"deploy_s", "control_plane_share", "in_cvm_s", "first_deploy_s", "n"}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench._common import emit, median, parse_quick, remove_vms
from pydstack.adapters.nats import free_port

PYDSTACK = str(Path(sys.executable).parent / "pydstack")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hello" / "docker-compose.yaml"


def _cli(home: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDSTACK_")}
    return subprocess.run([PYDSTACK, "--data-dir", str(home), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)  # fmt: skip


def _wait_ready(home: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"pydstack up exited:\n{log.read_text()[-2000:]}")
        if (home / "state.json").exists() and "control plane ready" in log.read_text():
            return
        time.sleep(0.2)
    raise SystemExit("pydstack up did not get ready within 120 s")


def _time(e: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(e["time"]).replace("Z", "+00:00")).timestamp()


def _in_cvm(home: Path, vm: str) -> float:
    """VmStarted -> the guest's "ready", by the events' own times."""
    r = _cli(home, "events", "--subject", f"dstack.vm.{vm}", "--json")
    events = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    started = next(_time(e) for e in events if e["type"] == "VmStarted")
    ready = next(_time(e) for e in events
                 if e["type"] == "VmBootProgress" and e["body"]["stage"] == "ready")  # fmt: skip
    return ready - started


def _kill_under(root: Path) -> None:
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if str(root).encode() in (d / "cmdline").read_bytes():
                    os.kill(int(d.name), signal.SIGKILL)


def _host_port() -> int:
    while True:
        p = random.randint(20000, 29999)
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", p))
            return p


def _deploy(home: Path, vm: str) -> float:
    t0 = time.perf_counter()
    # --port names the app's port (the URL gets "-8080"); the host side is any free one of the
    # VMM's range.
    r = _cli(home, "deploy", str(EXAMPLE), "--name", vm, "--vm-id", vm, "--memory", "256M",
             "--disk", "1G", "--port", f"{_host_port()}:8080", "--timeout", "150",
             "--json")  # fmt: skip
    took = time.perf_counter() - t0
    stages = [json.loads(x) for x in r.stdout.splitlines() if x.startswith('{"stage"')]
    print(f"{vm}: " + ", ".join(f"{x['stage']} {x['elapsed_s']:.1f}" for x in stages), flush=True)
    last = json.loads(r.stdout.splitlines()[-1]) if r.returncode == 0 and r.stdout else {}
    if r.returncode != 0 or not last.get("reachable"):
        raise SystemExit(f"deploy {vm} failed ({r.returncode}): {r.stdout[-800:]}{r.stderr}")
    return took


def main(quick: bool) -> None:
    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("wireguard-go"):
        raise SystemExit("bench.deploy needs root, dockerd (docker.io) and wireguard-go")
    n = 2 if quick else 5
    root = Path(tempfile.mkdtemp(prefix="pdb-", dir="/tmp"))  # short: UAPI socket paths
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
    try:
        _wait_ready(home, up, log)
        times, in_cvm = [], []
        for i in range(n + 1):  # the first one also imports the busybox image
            vm = f"bench{i}"
            vms.append(vm)
            took = _deploy(home, vm)
            cvm = _in_cvm(home, vm)
            print(f"{vm}: deploy {took:.2f} s, in the CVM {cvm:.2f} s", flush=True)
            if i:
                times.append(took)
                in_cvm.append(cvm)
            else:
                first = took
    finally:
        remove_vms(_cli, home, vms)
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
        _kill_under(root)  # the CVMs' supervisor outlives up by design
        shutil.rmtree(root, ignore_errors=True)
    d, c = median(times), median(in_cvm)
    print(
        f"deploy to HTTPS 200: median {d:.2f} s over {n} (first {first:.2f} s); "
        f"in the CVM {c:.2f} s; control plane {1 - c / d:.0%} (goal: deploy <= 10 s)"
    )
    emit({"deploy_s": d, "control_plane_share": 1 - c / d, "in_cvm_s": c,
          "first_deploy_s": first, "n": n})  # fmt: skip


if __name__ == "__main__":
    main(parse_quick(__doc__))
