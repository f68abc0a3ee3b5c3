"""`pydstack events` and `replay` against a real server: lines, JSON, filters, bad bytes."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from click.testing import CliRunner, Result

from pydstack.adapters.nats import NEW, EventStore, NatsServer
from pydstack.cli.main import main
from pydstack.core.events import HostJoined, Signer, VmRejected, VmRequested, VmResources


def invoke(tmp_path: Path, url: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["--data-dir", str(tmp_path / "home"), "--nats", url, *args])


def fill(url: str) -> float:
    """Three events, then a message that is not msgpack; returns a time between #2 and #3."""

    async def go() -> float:
        signer = Signer.from_private_bytes("tester", os.urandom(32))
        async with await EventStore.connect(url, signer) as store:
            await store.ensure_stream()
            await store.append("dstack.host.h1", [HostJoined(host_id="h1")], NEW)
            req = VmRequested(
                vm_id="v1", app_id="a", name="n", resources=VmResources(vcpu=1, memory_mb=512)
            )
            v = await store.append("dstack.vm.v1", [req], NEW)
            await asyncio.sleep(0.05)
            middle = time.time()
            await asyncio.sleep(0.05)
            await store.append("dstack.vm.v1", [VmRejected(vm_id="v1", reason="full")], v)
            await store.js.publish("dstack.vm.junk", b"\x00not an event")
            return middle

    return asyncio.run(go())


def test_events_prints_one_line_per_event_and_survives_bad_bytes(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    fill(nats_server.url)
    r = invoke(tmp_path, nats_server.url, "events")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert len(lines) == 4
    assert lines[1].split()[0] == "2" and "VmRequested" in lines[1] and "tester" in lines[1]
    assert "app_id=a" in lines[1] and "resources={vcpu=1,memory_mb=512" in lines[1]
    assert lines[3].split()[0] == "4" and "!! unparseable" in lines[3]


def test_events_json_filters_by_kind_and_since(tmp_path: Path, nats_server: NatsServer) -> None:
    middle = fill(nats_server.url)
    r = invoke(tmp_path, nats_server.url, "events", "--json", "--subject", "vm", "--since", "3")
    got = [json.loads(x) for x in r.output.splitlines()]
    assert [(e["seq"], e["type"], e["valid"]) for e in got] == [(3, "VmRejected", True),
                                                                (4, None, False)]  # fmt: skip
    assert got[0]["body"] == {"type": "VmRejected", "vm_id": "v1", "reason": "full"}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(middle)) + f"{middle % 1:.3f}"[1:] + "Z"
    r = invoke(tmp_path, nats_server.url, "events", "--json", "--since", stamp)
    assert [json.loads(x)["seq"] for x in r.output.splitlines()] == [3, 4]


def test_replay_until_shows_the_past(tmp_path: Path, nats_server: NatsServer) -> None:
    fill(nats_server.url)
    past = json.loads(invoke(tmp_path, nats_server.url, "replay", "--json", "--until", "2").output)
    assert past["seq"] == 2 and past["vms"]["v1"]["state"] == "requested"
    now = invoke(tmp_path, nats_server.url, "replay")
    assert "state at seq 4 (1 unreadable or refused messages skipped)" in now.output
    assert "v1  rejected" in now.output and "(full)" in now.output


def test_audit_without_keyring_reports_the_garbage(tmp_path: Path, nats_server: NatsServer) -> None:
    fill(nats_server.url)
    r = invoke(tmp_path, nats_server.url, "audit")
    assert r.exit_code == 1
    assert "seq 4: unparseable message on dstack.vm.junk" in r.output
    assert "no keyring" in r.output and "audited 4 events" in r.output
