"""A local Ethereum node for development and tests: Foundry's anvil, run as a process.

    with Anvil.start(log_dir) as node:
        w3 = Web3(Web3.HTTPProvider(node.url))

``make deps`` installs anvil from npm (``@foundry-rs/anvil-linux-amd64``) in ``.venv/anvil``.
It listens on a free loopback port and is killed when the block ends; its ten dev accounts are
unlocked and funded (``node.accounts``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from .errors import ChainError

__all__ = ["Anvil", "find_anvil"]

_PACKAGE: Final = Path("anvil/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
_LISTENING: Final = re.compile(r"Listening on (127\.0\.0\.1:\d+)")


def find_anvil() -> str:
    """``$PYDSTACK_ANVIL``, then the anvil ``make deps`` installs in the venv, then PATH."""
    configured = os.environ.get("PYDSTACK_ANVIL")
    if configured:
        return configured
    bundled = Path(sys.prefix) / _PACKAGE
    if bundled.is_file():
        return str(bundled)
    found = shutil.which("anvil")
    if found is None:
        raise ChainError(
            "no anvil: run `make deps` (installs it in .venv/anvil) or set PYDSTACK_ANVIL"
        )
    return found


class Anvil:
    """One anvil process; ``url`` is its JSON-RPC endpoint."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    @classmethod
    def start(cls, log_dir: Path, *, binary: str | None = None, timeout: float = 20.0) -> Anvil:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / "anvil.log"
        argv = [binary or find_anvil(), "--host", "127.0.0.1", "--port", "0", "--chain-id", "31337"]
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = _LISTENING.search(log.read_text(errors="replace"))
            if found:
                return cls(process, f"http://{found.group(1)}", log)
            if process.poll() is not None:
                break
            time.sleep(0.05)
        process.kill()
        process.wait()
        tail = log.read_text(errors="replace")[-300:]
        raise ChainError(f"anvil did not start within {timeout}s: {tail!r}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
