"""A CVM's console over the VMM API, as dstack's ``GET /logs?id=&follow=&ansi=&lines=&ch=``.

The last ``lines`` lines (dstack's default 10000), then with ``follow`` what is appended, with
``[vmm heartbeat]`` after a minute of silence as dstack; ANSI escapes are removed unless
``ansi`` is true. ``/logs/<id>``, pydstack's older path, sends the whole log with its colours
unless asked otherwise. Reading never loads more than one chunk: the tail is found by scanning
back for newlines. A bad parameter is 400 naming it, an unknown VM 404. Reading a log changes
nothing, so nothing is appended.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Final

from aiohttp import web

from ._actor import Vmm
from ._images import log_file

DEFAULT_LINES: Final = 10000  # dstack's DEFAULT_TAIL_LINES
MAX_LINES: Final = 1_000_000
CHUNK: Final = 64 * 1024
POLL_S: Final = 0.3
HEARTBEAT_S: Final = 60.0
LOG_CHECK_S: Final = 1.0  # how often a follower checks on the log that the VM still exists
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"", "0", "false", "no", "off"})
# CSI (colours, cursor), OSC (titles, links) and the two-byte escapes; what strip-ansi-escapes
# removes for dstack.
_ANSI: Final = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


class BadQuery(ValueError):
    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field, self.status = field, status


def _flag(request: web.Request, name: str, default: bool = False) -> bool:
    value = request.query.get(name, "").lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadQuery(name, f"{name} must be true or false, not {value[:20]!r}")


def _lines(request: web.Request, default: int | None) -> int | None:
    raw = request.query.get("lines")
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or int(raw) > MAX_LINES:
        raise BadQuery("lines", f"lines must be a whole number 0..{MAX_LINES}, not {raw[:20]!r}")
    return int(raw)


def tail_offset(path: Path, lines: int | None) -> int:
    """Where the last ``lines`` lines of ``path`` start (``None``: the whole file)."""
    if lines is None:
        return 0
    with path.open("rb") as f:
        end = f.seek(0, 2)
        pos, seen = end, 0
        if end and (f.seek(end - 1), f.read(1))[1] == b"\n":
            seen = -1  # the final newline ends the last line, it does not start one
        while pos > 0:
            step = min(CHUNK, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            for i in range(len(block) - 1, -1, -1):
                if block[i] == 0x0A:
                    seen += 1
                    if seen >= lines:
                        return pos + i + 1
        return 0


def _read(path: Path, offset: int) -> tuple[bytes, int]:
    """Up to a chunk from ``offset`` (from 0 again when the file shrank: replaced)."""
    try:
        with path.open("rb") as f:
            if f.seek(0, 2) < offset:
                offset = 0
            f.seek(offset)
            data = f.read(CHUNK)
    except FileNotFoundError:
        return b"", offset
    return data, offset + len(data)


class _Cleaner:
    """Strips ANSI escapes from whole lines (a sequence cut by a chunk boundary waits)."""

    def __init__(self) -> None:
        self.rest = b""

    def feed(self, data: bytes, final: bool = False) -> bytes:
        data = self.rest + data
        cut = len(data) if final else data.rfind(b"\n") + 1
        self.rest = data[cut:]
        return _ANSI.sub(b"", data[:cut])


async def serve_logs(
    request: web.Request, vmm: Vmm, vm_id: str, lines: int | None, *, ansi_default: bool = False
) -> web.StreamResponse:
    follow, ansi = _flag(request, "follow"), _flag(request, "ansi", ansi_default)
    if request.query.get("ch", "serial") != "serial":
        raise BadQuery("ch", "ch: only 'serial' (the CVM's console) is kept here")
    await vmm.view.catch_up(vmm.store)
    rec = vmm.view.vms.get(vm_id)
    here = vmm.config.host_id
    if rec is None or (rec.vm.host != here and rec.vm.pinned_host != here):
        raise BadQuery("id", f"no vm {vm_id} on this host", 404)
    path = log_file(vmm.backend, vm_id)
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    clean = None if ansi else _Cleaner()
    offset = await asyncio.to_thread(tail_offset, path, lines) if path and path.exists() else 0
    quiet_since = last_read = time.monotonic()
    while True:
        data, offset = await asyncio.to_thread(_read, path, offset) if path else (b"", 0)
        if data:
            quiet_since = time.monotonic()
            await resp.write(clean.feed(data) if clean else data)
            continue  # more may be waiting
        if not follow or request.transport is None or request.transport.is_closing():
            break  # done, or the client went away
        if time.monotonic() - last_read >= LOG_CHECK_S:  # is the VM still there?
            last_read = time.monotonic()
            await vmm.view.catch_up(vmm.store)
            gone = vmm.view.vms.get(vm_id)
            if gone is None or gone.vm.state == "removed":
                break
        if time.monotonic() - quiet_since >= HEARTBEAT_S:
            quiet_since = time.monotonic()
            await resp.write(b"[vmm heartbeat]\n")
        await asyncio.sleep(POLL_S)
    if clean and clean.rest:
        await resp.write(clean.feed(b"", final=True))
    await resp.write_eof()
    return resp


async def logs_query(request: web.Request, vmm: Vmm) -> web.StreamResponse:
    """dstack's ``/logs?id=...``."""
    try:
        vm_id = request.query.get("id", "")
        if not vm_id:
            raise BadQuery("id", "id: which VM's log (GET /logs?id=VM_ID)")
        return await serve_logs(request, vmm, vm_id, _lines(request, DEFAULT_LINES))
    except BadQuery as exc:
        return web.json_response({"error": str(exc), "field": exc.field}, status=exc.status)


async def logs_path(request: web.Request, vmm: Vmm) -> web.StreamResponse:
    """pydstack's ``/logs/<id>``: the whole log, as written (colours kept), unless ``lines``
    / ``ansi`` say otherwise."""
    try:
        vm_id = request.match_info["vm_id"]
        return await serve_logs(request, vmm, vm_id, _lines(request, None), ansi_default=True)
    except BadQuery as exc:
        return web.json_response({"error": str(exc), "field": exc.field}, status=exc.status)
