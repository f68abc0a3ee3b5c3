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


def test_the_owner_revokes_one_compose_version_and_the_kms_stops_serving_it(
    plane: Up, tmp_path: Path
) -> None:
    """app revoke-compose: the withdrawn version gets a KeyDenied from up's KMS (log backend),
    the current one still gets its keys; info and the app's story show it; revoking it twice,
    or a hash the app never allowed, is a one-line error."""
    import asyncio

    import pytest

    from pydstack_guest.provider import KeyProviderError

    from .support import guest_env_key

    d = plane.data_dir
    code, lines, err = deploy(plane, str(write_app(tmp_path, "shop", tag="1")), "--no-wait")
    assert code == 0, err
    first = merged(lines)
    app_id, v1 = first["app_id"], first["compose_hash"]
    r = cli(d, "app", "upgrade", app_id, str(write_app(tmp_path / "v2", "shop", tag="2")),
            "--json")  # fmt: skip
    assert r.code == 0, r.err
    *_, (_, _, upgraded) = events_of(plane, f"dstack.app.{app_id}")
    assert isinstance(upgraded, AppUpgraded)
    assert asyncio.run(guest_env_key(plane, first["app_compose"]))  # v1 is allowed so far

    r = cli(d, "app", "revoke-compose", app_id, v1, "--reason", "CVE-2026-7", "--json")
    assert r.code == 0, r.err
    assert r.lines()[0]["compose_hash"] == v1
    with pytest.raises(KeyProviderError, match=f"compose hash {v1} is not one app"):
        asyncio.run(guest_env_key(plane, first["app_compose"]))
    assert asyncio.run(guest_env_key(plane, upgraded.compose.decode(), app_id))  # v2 served

    info = cli(d, "app", "info", app_id, "--json").lines()[0]
    assert info["app"]["revoked"] == [v1] and info["app"]["history"][0] == v1
    assert f"{v1}  REVOKED" in cli(d, "app", "info", app_id).out
    story = cli(d, "audit", "--app", app_id, "--json").lines()
    assert any("revoked" in line.get("text", "") and "CVE-2026-7" in line["text"]
               for line in story)  # fmt: skip
    again = cli(d, "app", "revoke-compose", app_id, v1)
    assert again.code == 1 and "already revoked" in again.err
    unknown = cli(d, "app", "revoke-compose", app_id, "ab" * 32)
    assert unknown.code == 1 and "is not one app" in unknown.err
    assert len(unknown.err.strip().splitlines()) == 1
