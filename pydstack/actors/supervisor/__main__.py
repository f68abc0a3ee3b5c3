"""``python -m pydstack.actors.supervisor --socket PATH --state-dir DIR``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from pydstack.adapters.supervisor import SupervisorError
from pydstack.logs import configure

from ._core import SupervisorSettings
from ._server import serve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pydstack.actors.supervisor")
    p.add_argument("--socket", required=True, type=Path, help="unix socket to serve the API on")
    p.add_argument("--state-dir", required=True, type=Path, help="pid files, states and logs")
    p.add_argument("--log-max-bytes", type=int, default=16 * 1024 * 1024)
    p.add_argument("--log-backups", type=int, default=3)
    p.add_argument("--rotate-interval", type=float, default=1.0, help="seconds")
    p.add_argument(
        "--stop-all-on-exit",
        action="store_true",
        help="stop every process on SIGTERM instead of leaving it to be adopted",
    )
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    configure(level=a.log_level)
    settings = SupervisorSettings(
        state_dir=a.state_dir.resolve(),
        log_max_bytes=a.log_max_bytes,
        log_backups=a.log_backups,
        rotate_interval_s=a.rotate_interval,
    )
    try:
        asyncio.run(serve(a.socket.resolve(), settings, stop_all_on_exit=a.stop_all_on_exit))
    except SupervisorError as e:
        print(f"supervisor: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
