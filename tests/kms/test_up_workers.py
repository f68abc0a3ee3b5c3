"""`pydstack up --kms-workers 2`: the KMS of `up` runs as worker processes and serves a
simulated guest's keys, decided once on the log by one of its workers."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.harness import Up, cli, register_busybox_image
from tests.cli.test_up_kms import guest_gets_keys


def test_up_serves_keys_from_kms_workers(tmp_path: Path) -> None:
    home = tmp_path / "home"
    plane = Up(home, extra=("--no-gateway", "--kms-workers", "2")).start()
    try:
        assert plane.ready()["kms"].startswith("https://127.0.0.1:")  # type: ignore[index]
        compose = tmp_path / "app-compose.json"
        compose.write_text('{"manifest_version":2,"name":"demo","runner":"docker-compose"}')
        assert cli(home, "app", "register", str(compose)).code == 0
        guest_gets_keys(home, tmp_path, register_busybox_image(home), "--compose", str(compose))
        r = cli(home, "events", "--subject", "dstack.kms.*", "--json")
        assert r.code == 0, r.err
        evs = r.lines()
        assert [e["type"] for e in evs][-2:] == ["KeyRequested", "KeyIssued"]
        label = evs[-2]["body"]["kms_instance"]
        assert label.rsplit("#w", 1)[1] in ("0", "1"), json.dumps(evs[-2]["body"])[:300]
        assert cli(home, "audit").code == 0
    finally:
        assert plane.stop() == 0
