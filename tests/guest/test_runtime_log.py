"""dstack's runtime event log file and socket paths, on a simulated TD."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

from dstack_sdk import AsyncDstackClient, AsyncTappdClient

from pydstack.adapters.tdx.backend import SimulatorBackend
from pydstack.adapters.tdx.eventlog import replay_runtime_events, runtime_events_of
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.simulator import QuoteSimulator, TdMeasurements
from pydstack_guest import GuestAgent, GuestConfig, boot_runtime_events, serve_agent
from pydstack_guest.runtime_log import RuntimeEventFile

from .conftest import APP_COMPOSE, APP_ID, INSTANCE_ID, OS_IMAGE_HASH, Guest


async def test_runtime_events_log_has_every_rtmr3_event_as_dstack_writes_it(
    dev_pki: DevPki, sock_dir: Path, guest: Guest
) -> None:
    """Boot events and EmitEvent go to runtime_events.log (0600) as dstack's JSON lines
    (payload base64), in RTMR3's order: replaying the file gives the quote's RTMR3."""
    log = sock_dir / "run" / "log" / "dstack" / "runtime_events.log"
    backend = RuntimeEventFile(
        SimulatorBackend(QuoteSimulator(dev_pki), TdMeasurements(mr_td=bytes(48))), log
    )
    await boot_runtime_events(backend, guest.keys, app_id=APP_ID, app_compose=APP_COMPOSE,
                              instance_id=INSTANCE_ID, os_image_hash=OS_IMAGE_HASH)  # fmt: skip
    agent = GuestAgent(backend, guest.keys, GuestConfig(app_compose=APP_COMPOSE))
    async with (
        serve_agent(agent, dstack_sock=str(sock_dir / "l.sock")),
        AsyncDstackClient(str(sock_dir / "l.sock")) as c,
    ):
        await c.emit_event("my-event", b"\x00\xffpayload")
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert list(lines[0]) == ["event", "payload"]
    assert lines[1] == {"event": "app-id", "payload": base64.b64encode(APP_ID).decode()}
    assert lines[-1] == {
        "event": "my-event",
        "payload": base64.b64encode(b"\x00\xffpayload").decode(),
    }
    events = runtime_events_of(backend.event_log())
    assert [(e["event"], base64.b64decode(e["payload"])) for e in lines] == [
        (e.event, e.payload) for e in events
    ]
    assert replay_runtime_events(events) == backend.read_rtmrs()[3]
    assert hashlib.sha256(APP_COMPOSE.encode()).digest() == base64.b64decode(lines[2]["payload"])


async def test_the_api_is_served_at_every_dstack_socket_path(sock_dir: Path, guest: Guest) -> None:
    """dstack_aliases serve the same API (dstack's /var/run/dstack/dstack.sock), and the
    tappd socket also answers the SDKs' /Info; every socket has the mode asked (dstack's
    CVMs: 0777), 0660 by default."""
    assert stat.S_IMODE(os.stat(guest.dstack_sock).st_mode) == 0o660
    alias, tappd = sock_dir / "dstack" / "dstack.sock", sock_dir / "t2.sock"
    async with serve_agent(guest.agent, dstack_sock=str(sock_dir / "m.sock"),
                           dstack_aliases=[str(alias)], tappd_sock=str(tappd),
                           socket_mode=0o777):  # fmt: skip
        for path in (sock_dir / "m.sock", alias, tappd):
            assert stat.S_IMODE(path.stat().st_mode) == 0o777
        for path in (sock_dir / "m.sock", alias):
            async with AsyncDstackClient(str(path)) as c:
                assert (await c.info()).app_id == APP_ID.hex()
        async with AsyncTappdClient(str(tappd)) as t:
            assert (await t.info()).app_id == APP_ID.hex()
    assert not alias.exists() and not tappd.exists()
