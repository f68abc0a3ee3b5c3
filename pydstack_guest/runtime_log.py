"""dstack's runtime event log file: every RTMR3 runtime event, one JSON line each.

dstack's guest (cc-eventlog ``RuntimeEvent::emit``) appends ``{"event": name, "payload":
base64}`` to ``/run/log/dstack/runtime_events.log`` (mode 0600, root only) for each event it
extends RTMR3 with, boot events and ``EmitEvent`` alike; tools in the CVM read it back.
`RuntimeEventFile` is a `TdxBackend` that does the same around another backend, writing the
line under the same lock as the extend so the file's order is RTMR3's::

    backend = RuntimeEventFile(measured_simulator(...), Path(RUNTIME_EVENT_LOG))
"""

from __future__ import annotations

import base64
import json
import os
import threading
from pathlib import Path

from pydstack.adapters.tdx.backend import Rtmrs, TdxBackend
from pydstack.adapters.tdx.eventlog import TdxEvent

RUNTIME_EVENT_LOG = "/run/log/dstack/runtime_events.log"


def runtime_event_line(name: str, payload: bytes) -> bytes:
    """One line as dstack writes it (serde_json of `RuntimeEvent`, payload in base64)."""
    body = {"event": name, "payload": base64.b64encode(payload).decode()}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class RuntimeEventFile:
    """`backend`, plus each `emit_event` appended to `path` (created 0600, parents made)."""

    def __init__(self, backend: TdxBackend, path: Path) -> None:
        self._backend, self.path = backend, path
        self._lock = threading.Lock()

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def emit_event(self, name: str, payload: bytes) -> TdxEvent:
        with self._lock:
            event = self._backend.emit_event(name, payload)
            self._append(runtime_event_line(name, payload))
        return event

    def get_quote(self, report_data: bytes) -> bytes:
        return self._backend.get_quote(report_data)

    def extend_rtmr(self, index: int, digest: bytes) -> None:
        self._backend.extend_rtmr(index, digest)

    def read_rtmrs(self) -> Rtmrs:
        return self._backend.read_rtmrs()

    def record(self, event: TdxEvent) -> None:
        self._backend.record(event)

    def event_log(self) -> list[TdxEvent]:
        return self._backend.event_log()

    def attest(self, report_data: bytes) -> tuple[bytes, list[TdxEvent]]:
        return self._backend.attest(report_data)
