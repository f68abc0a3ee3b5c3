"""Drive `pydstack` as a user does: real processes, a temp data dir, a free port."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydstack.adapters.nats import free_port

PYDSTACK = str(Path(sys.executable).parent / "pydstack")


@dataclass
class Result:
    code: int
    out: str
    err: str

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.out.splitlines() if x.strip()]


def cli(data_dir: Path, *args: str, timeout: float = 60) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDSTACK_")}
    p = subprocess.run([PYDSTACK, "--data-dir", str(data_dir), *args], capture_output=True,
                       text=True, timeout=timeout, env=env)  # fmt: skip
    return Result(p.returncode, p.stdout, p.stderr)


def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Up:
    """A `pydstack up` child process; its JSON log lines are in `log`."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def start(self, *, port: bool = True) -> Up:
        self.log = self.data_dir.parent / f"up-{time.monotonic_ns()}.log"
        args = [PYDSTACK, "up", "--data-dir", str(self.data_dir), "--metrics-port", "-1",
                "--reconcile-interval", "1", "--log-json", *self.extra]  # fmt: skip
        if port:
            args += ["--port", str(self.port)]
        if not any(a.startswith("--gateway") or a == "--no-gateway" for a in self.extra):
            # pytest's deep tmp paths overflow wireguard-go's UAPI socket path; the gateway of
            # `up` is tested with short dirs in tests/gateway_nodes/test_up.py.
            args.append("--no-gateway")
        with self.log.open("wb") as f:
            env = {k: v for k, v in os.environ.items() if not k.startswith("PYDSTACK_")}
            self.proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env)
        wait_for(lambda: self.ready() or self.proc.poll() is not None,  # type: ignore[union-attr]
                 what="`pydstack up` to be ready")  # fmt: skip
        assert self.proc.poll() is None, self.text()
        return self

    def text(self) -> str:
        return self.log.read_text() if self.log and self.log.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": line})
        return out

    def ready(self) -> dict[str, Any] | None:
        return next((e for e in self.events() if e.get("event") == "control plane ready"), None)

    def nats_pid(self) -> int:
        [ports] = (self.data_dir / "nats" / "ports").iterdir()
        return int(ports.stem.rsplit("_", 1)[1])

    def stop(self, sig: int = signal.SIGINT) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


def kill_processes_under(root: Path) -> list[int]:
    """SIGKILL every process whose command line names ``root`` (what a test's `up` left:
    supervisors, which outlive the VMM by design); returns their pids."""
    killed = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if str(root).encode() in (d / "cmdline").read_bytes():
                os.kill(int(d.name), signal.SIGKILL)
                killed.append(int(d.name))
        except (OSError, ProcessLookupError):
            continue
    return killed


def free_host_port() -> int:
    """A free port in the VMM's default host range (20000-29999)."""
    while True:
        p = random.randint(20000, 29999)
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", p))
            return p


def register_busybox_image(home: Path) -> Path:
    """A sandbox image registered on the log of the `up` in `home` with `pydstack image
    register` (as the admin does for an image `up` did not register itself); its directory."""
    from pydstack.adapters.sandbox import build_busybox_image

    root = home / "test-images"
    if not (root / "sandbox-busybox" / "metadata.json").exists():
        build_busybox_image(root)
    r = cli(home, "image", "register", str(root / "sandbox-busybox"))
    assert r.code == 0 and "registered" in r.out, r.out + r.err
    return root / "sandbox-busybox"
