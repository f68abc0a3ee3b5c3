"""A client for HAProxy's runtime API (the admin ``stats socket``, a unix socket).

Commands go over one connection in interactive mode (``prompt``), pipelined: every
command's answer ends with a ``"\\n> "`` prompt, so N commands cost one round trip.

Usage::

    api = RuntimeApi(paths.admin)
    await api.apply(["add map /run/x/apps.map app1 i1"])     # raises on any complaint
    info = await api.info()                                   # {"Pid": "1234", ...}
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

_PROMPT = "\n> "
_CHUNK = 500  # commands per connection: HAProxy reads them as fast as it answers


class HaproxyError(RuntimeError):
    """HAProxy refused to start, or a runtime command was refused (the message says which)."""


def _quiet_ok(command: str, answer: str) -> bool:
    """Whether ``answer`` is success for ``command`` (most commands answer nothing)."""
    if command.startswith("set server") and " addr " in command:
        return "changed from" in answer or "no need to change" in answer
    return answer.strip() == ""


class RuntimeApi:
    def __init__(self, socket_path: Path, *, timeout: float = 10.0) -> None:
        self.path = socket_path
        self.timeout = timeout

    async def execute(self, commands: Sequence[str]) -> list[str]:
        """Answers to ``commands`` in order (one connection per ``_CHUNK`` commands)."""
        answers: list[str] = []
        for start in range(0, len(commands), _CHUNK):
            answers += await self._session(commands[start : start + _CHUNK])
        return answers

    async def _session(self, commands: Sequence[str]) -> list[str]:
        for c in commands:
            if "\n" in c:
                raise ValueError(f"runtime command {c!r} spans lines")
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(str(self.path))
                try:
                    script = "prompt\n" + "".join(f"{c}\n" for c in commands) + "quit\n"
                    writer.write(script.encode())
                    await writer.drain()
                    data = (await reader.read()).decode(errors="replace")
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            raise HaproxyError(
                f"HAProxy runtime API at {self.path}: {exc!r}; is HAProxy running?"
            ) from exc
        parts = data.split(_PROMPT)
        # parts[0] answers "prompt" itself; then one part per command; "quit" answers nothing.
        answers = [p.removeprefix("\n") for p in parts[1 : len(commands) + 1]]
        if len(answers) != len(commands):
            raise HaproxyError(
                f"HAProxy answered {len(answers)} of {len(commands)} commands: {data[-300:]!r}"
            )
        return answers

    async def command(self, command: str) -> str:
        return (await self.execute([command]))[0]

    async def apply(self, commands: Sequence[str]) -> None:
        """Run ``commands``; raise `HaproxyError` naming every one HAProxy complained about."""
        answers = await self.execute(commands)
        pairs = zip(commands, answers, strict=True)
        bad = [f"{c!r}: {a.strip()}" for c, a in pairs if not _quiet_ok(c, a)]
        if bad:
            raise HaproxyError(f"{len(bad)} runtime command(s) refused: " + "; ".join(bad[:5]))

    async def info(self) -> dict[str, str]:
        """``show info`` as a dict (``Pid``, ``Uptime_sec``, ``CurrConns``, ...)."""
        out = {}
        for line in (await self.command("show info")).splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out[key.strip()] = value.strip()
        return out

    async def stat(self) -> list[dict[str, str]]:
        """``show stat`` rows as dicts keyed by the CSV header (``pxname``, ``svname``, ...)."""
        lines = (await self.command("show stat")).splitlines()
        if not lines or not lines[0].startswith("# "):
            raise HaproxyError(f"unexpected `show stat` answer: {lines[:1]!r}")
        header = lines[0][2:].split(",")
        return [dict(zip(header, row.split(","), strict=False)) for row in lines[1:] if row]

    async def table(self, name: str) -> dict[str, dict[str, str]]:
        """``show table <name>``: entry key -> its data (``conn_cur`` ...)."""
        out: dict[str, dict[str, str]] = {}
        for line in (await self.command(f"show table {name}")).splitlines():
            if line.startswith("#") or "key=" not in line:
                continue
            fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
            out[fields.pop("key", "")] = fields
        return out
