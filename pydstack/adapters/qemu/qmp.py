"""QMP control of one running QEMU: status, graceful power-down with a deadline, exit reason.

Usage::

    async with await Qmp.connect(Path(workdir, "qmp.sock")) as q:
        print(await q.status())                 # "running", "paused", "shutdown", ...
        reason = await q.shutdown(timeout_s=30)  # ACPI power button, then quit if ignored

``shutdown`` answers why QEMU stopped: the ``SHUTDOWN`` event's reason when the guest powered
off (``guest-shutdown``), ``host-qmp-quit`` when the deadline passed and QEMU was told to quit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError


class QmpError(Exception):
    """QMP failed; the message says on which socket and what to check."""


class Qmp:
    def __init__(self, client: QMPClient, socket: Path) -> None:
        self._client = client
        self.socket = socket
        self._shutdowns = EventListener(("SHUTDOWN",))
        client.register_listener(self._shutdowns)
        self.last_shutdown: dict[str, Any] | None = None

    @classmethod
    async def connect(cls, socket: Path, *, timeout_s: float = 10.0) -> Qmp:
        """Connect, retrying while QEMU has not created the socket yet."""
        deadline = time.monotonic() + timeout_s
        while True:
            client = QMPClient(f"qmp:{socket.name}")
            try:
                await client.connect(str(socket))
                return cls(client, socket)
            except (ConnectError, OSError) as e:
                if time.monotonic() >= deadline:
                    raise QmpError(
                        f"QMP at {socket}: cannot connect ({e}); is the VM running "
                        "and its -qmp socket at this path?"
                    ) from None
                await asyncio.sleep(0.1)

    async def __aenter__(self) -> Qmp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.remove_listener(self._shutdowns)
        # After quit QEMU closes the socket first; disconnect may then raise EOF/reset.
        with contextlib.suppress(QMPError, EOFError, ConnectionError, OSError):
            await self._client.disconnect()

    async def execute(self, command: str, arguments: dict[str, object] | None = None) -> Any:
        try:
            return await self._client.execute(command, arguments)
        except ExecuteError as e:
            raise QmpError(f"QMP {command} at {self.socket}: {e}") from None
        except (QMPError, EOFError, ConnectionError) as e:
            raise QmpError(f"QMP {command} at {self.socket}: connection lost ({e})") from None

    async def status(self) -> str:
        """QEMU's run state: ``running``, ``paused``, ``shutdown``, ``guest-panicked``..."""
        result = await self.execute("query-status")
        return str(result["status"])

    async def wait_shutdown(self, timeout_s: float) -> str | None:
        """The reason of the next SHUTDOWN event, or None when none came in time."""
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the event when it and
        # a cancel arrive together, losing the cancel (a cancelled VM stop would run on).
        try:
            async with asyncio.timeout(timeout_s):
                event = await self._shutdowns.get()
        except TimeoutError:
            return None
        raw = event.get("data")
        data: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
        self.last_shutdown = data
        return str(data.get("reason", "unknown"))

    async def powerdown(self) -> None:
        """Press the ACPI power button (the guest decides whether and how fast to stop)."""
        await self.execute("system_powerdown")

    async def quit(self) -> None:
        with contextlib.suppress(QmpError):  # QEMU may close the socket before answering
            await self.execute("quit")

    async def shutdown(self, timeout_s: float = 30.0) -> str:
        """Power button, wait up to ``timeout_s`` for the guest, then ``quit``; the reason."""
        self._shutdowns.clear()
        await self.powerdown()
        reason = await self.wait_shutdown(timeout_s)
        if reason is not None and reason.startswith("guest"):
            return reason
        await self.quit()
        return reason or "host-qmp-quit"
