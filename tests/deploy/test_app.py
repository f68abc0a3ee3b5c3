"""`pydstack app ls|info|upgrade|rm` on apps deployed through `pydstack deploy`."""

from __future__ import annotations

import json
from pathlib import Path

from pydstack.core.events import AppRemoved, AppUpgraded, VmRemoveRequested, VmUpdateRequested
from tests.cli.harness import Up, cli

from .support import deploy, events_of, merged, write_app


def test_upgrade_keeps_the_app_id_and_rm_removes_its_vms(plane: Up, tmp_path: Path) -> None:
    """ls and info show the app; upgrade appends AppUpgraded + an update for its VM (same app id,
    history of both hashes); a compose naming another app id is refused; rm removes the app and
    asks its VM to go; a second rm is refused."""
    d = plane.data_dir
    compose = write_app(tmp_path, "blog", tag="1")
    (tmp_path / ".env").write_text("SECRET=1\n")
    code, lines, err = deploy(plane, str(compose), "--env-file", str(tmp_path / ".env"),
                              "--no-wait")  # fmt: skip
    assert code == 0, err
    first = merged(lines)
    app_id, vm_id = first["app_id"], first["vm_id"]

    rows = {r["app_id"]: r for r in cli(d, "app", "ls", "--json").lines()}
    assert rows[app_id]["name"] == "blog" and rows[app_id]["vms"] == 1
    assert rows[app_id]["status"] == "active"

    new = write_app(tmp_path / "v2", "blog", tag="2")
    r = cli(d, "app", "upgrade", app_id[:10], str(new), "--json")  # a unique prefix is enough
    assert r.code == 0, r.err
    [up] = r.lines()
    assert up["outcome"] == "upgraded" and up["vms"] == [vm_id]
    assert up["previous_compose_hash"] == first["compose_hash"]
    *_, (_, _, upgraded) = events_of(plane, f"dstack.app.{app_id}")
    assert isinstance(upgraded, AppUpgraded) and upgraded.compose_hash == up["compose_hash"]
    assert json.loads(upgraded.compose)["allowed_envs"] == ["SECRET"]  # kept for the VM's env
    *_, (_, _, update) = events_of(plane, f"dstack.vm.{vm_id}")
    assert isinstance(update, VmUpdateRequested) and update.compose == upgraded.compose
    text = cli(d, "app", "upgrade", app_id, str(new))
    assert text.code == 0 and "nothing to do" in text.out

    info = cli(d, "app", "info", app_id, "--json").lines()[0]
    assert info["app"]["history"] == [first["compose_hash"], up["compose_hash"]]
    assert info["app"]["app_id"] == app_id and info["app"]["upgrades"] == 1
    assert [v["vm_id"] for v in info["vms"]] == [vm_id]
    assert info["vms"][0]["encrypted_env_bytes"] > 60 and info["keys"] == []
    human = cli(d, "app", "info", app_id)
    assert f"  was  1  {first['compose_hash']}" in human.out and vm_id in human.out

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"manifest_version": 2, "name": "x", "app_id": "ee" * 20}))
    r = cli(d, "app", "upgrade", app_id, str(other))
    assert r.code == 1 and f"names app id {'ee' * 20}, not {app_id}" in r.err

    r = cli(d, "app", "rm", app_id, "--reason", "done", "--json")
    assert r.code == 0, r.err
    assert r.lines()[0]["vms"] == [vm_id]
    *_, (_, _, removed) = events_of(plane, f"dstack.app.{app_id}")
    assert isinstance(removed, AppRemoved) and removed.reason == "done"
    *_, (_, actor, rm) = events_of(plane, f"dstack.vm.{vm_id}")
    assert isinstance(rm, VmRemoveRequested) and actor == "operator"
    rows = {r["app_id"]: r for r in cli(d, "app", "ls", "--json").lines()}
    assert rows[app_id]["status"] == "removed"
    again = cli(d, "app", "rm", app_id)
    assert again.code == 1 and "already removed" in again.err


def test_unknown_app_is_a_one_line_error(plane: Up) -> None:
    for args in (("app", "info", "0" * 40), ("app", "rm", "0" * 40), ("audit", "--app", "0" * 40)):
        r = cli(plane.data_dir, *args)
        assert r.code == 1 and len(r.err.strip().splitlines()) == 1, r.err
        assert "no app" in r.err or "no events of app" in r.err
