"""`pydstack audit --app`: the app's story in order, every event and KeyIssued re-verified."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import nkeys

from pydstack.adapters.nats.identity import IdentityStore, inbox_prefix
from pydstack.core.events import VmStopped, seal
from tests.cli.harness import Up, cli

from .support import deploy, guest_env_key, merged, write_app


def test_story_includes_the_guests_key_and_rechecks_it(plane: Up, tmp_path: Path) -> None:
    """registered, requested, placed, scheduled, attested, key issued (backend dev, BootInfo
    of this app): in seq order, each with its actor; the KeyIssued is re-verified; app info
    lists the key."""
    compose = write_app(tmp_path, "story")
    code, lines, err = deploy(plane, str(compose), "--no-wait")
    assert code == 0, err
    out = merged(lines)
    app_id = out["app_id"]
    asyncio.run(guest_env_key(plane, out["app_compose"]))
    r = cli(plane.data_dir, "audit", "--app", app_id, "--json")
    assert r.code == 0, r.out + r.err
    *story, summary = r.lines()
    seqs = [x["seq"] for x in story]
    assert seqs == sorted(seqs)
    types = [x["type"] for x in story]
    assert types[:2] == ["AppRegistered", "VmRequested"] and types[-2:] == [
        "KeyRequested", "KeyIssued"]  # fmt: skip
    assert {"HostVmPlaced", "VmScheduled"} <= set(types)
    assert [x["actor"] for x in story if x["type"] in ("VmScheduled", "KeyIssued")] == [
        "scheduler", "kms"]  # fmt: skip
    issued = story[-1]["text"]
    assert "backend log" in issued and f"app {app_id[:12]}" in issued and "tcb UpToDate" in issued
    # the KMS measured it as the image `up` registered, for the VM's shape
    assert "image check: os image sandbox-busybox" in issued
    assert "MRTD, RTMR0-2 match for 1 vCPU, 512 MiB (simulated)" in issued
    assert all(not x["problems"] for x in story)
    assert summary["summary"]["keys_rechecked"] == 1 and summary["summary"]["ok"] is True
    assert summary["summary"]["errors"] == 0
    info = cli(plane.data_dir, "app", "info", app_id, "--json").lines()[0]
    assert [(k["outcome"], k["backend"]) for k in info["keys"]] == [("issued", "log")]


async def _publish_raw(url: str, subject: str, data: bytes, seed: str) -> int:
    prefix = inbox_prefix(nkeys.from_seed(seed.encode()).public_key.decode())
    nc = await nats.connect(url, nkeys_seed_str=seed, inbox_prefix=prefix)  # its own replies
    try:
        return int((await nc.jetstream().publish(subject, data)).seq)
    finally:
        await nc.close()


def test_a_tampered_event_in_the_story_fails_naming_its_seq(plane: Up, tmp_path: Path) -> None:
    """A VmStopped whose signature does not verify, stored on the app's VM subject: audit --app
    prints it in the story, marks it, and exits 1 naming its seq; other apps' stories pass."""
    bystander = write_app(tmp_path, "bystander")
    code, lines, err = deploy(plane, str(bystander), "--no-wait")
    assert code == 0, err
    other_app = merged(lines)["app_id"]
    code, lines, err = deploy(plane, str(write_app(tmp_path, "victim")), "--no-wait")
    assert code == 0, err
    out = merged(lines)
    app_id, vm_id = out["app_id"], out["vm_id"]
    assert cli(plane.data_dir, "audit", "--app", app_id).code == 0
    oper = IdentityStore(plane.data_dir / "identities").load("operator")
    assert oper is not None
    subj = f"dstack.vm.{vm_id}"
    forged = seal(oper.signer, VmStopped(vm_id=vm_id), subject=subj, event_id="forged",
                  time_ns=1, correlation="x")  # fmt: skip
    url = plane.ready()["nats_url"]  # type: ignore[index]
    seq = asyncio.run(_publish_raw(url, subj, forged[:-64] + bytes(64), oper.seed))
    r = cli(plane.data_dir, "audit", "--app", app_id)
    assert r.code == 1
    assert f"✗ seq {seq} " in r.out
    assert f"audit of app {app_id} failed at seq {seq}: bad signature" in r.err
    ok = cli(plane.data_dir, "audit", "--app", other_app)
    assert ok.code == 0, ok.err
    assert "2 errors elsewhere in the log" in ok.out  # bad signature + broken chain, not its
