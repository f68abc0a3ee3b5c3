"""Ctrl-C ends any command promptly: a clean shutdown, or a forced exit when it stalls."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

# A command that prints "ready", waits, and on cancellation runs `{shutdown}`.
COMMAND = """
import asyncio
import pydstack.cli._common as common
common.FORCE_EXIT_S = 0.5

async def command():
    print("ready", flush=True)
    try:
        await asyncio.sleep(3600)
    finally:
        {shutdown}

common.run(command())
"""
# A shutdown that never ends (e.g. a stuck close), and one that ends at once.
STUBBORN = COMMAND.format(shutdown='print("shutting down", flush=True); await asyncio.sleep(3600)')
CLEAN = COMMAND.format(shutdown='print("closed", flush=True)')


def _interrupt(code: str) -> tuple[int, str, str, float]:
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline() == "ready\n"
    t = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=20)
    return p.returncode, out, err, time.monotonic() - t


def test_a_command_that_stalls_after_ctrl_c_is_ended_with_130() -> None:
    code, out, err, took = _interrupt(STUBBORN)
    assert code == 130 and "shutting down" in out
    assert "still shutting down after 0.5s: exiting" in err
    assert took < 5


def test_a_command_that_shuts_down_cleanly_exits_130_without_a_traceback() -> None:
    code, out, err, took = _interrupt(CLEAN)
    assert code == 130 and out.endswith("closed\n")
    assert "Traceback" not in err and "exiting" not in err
    assert took < 5
