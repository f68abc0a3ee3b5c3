"""The rendered HAProxy config (golden file, accepted by `haproxy -c`) and the pure map
state and diffs the plane sends through the runtime API.

Regenerate the golden file after an intended change with
``PYDSTACK_REGEN_GOLDEN=1 pytest tests/haproxy/test_config.py`` and review the diff.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pydstack.adapters.haproxy import (
    HaproxyConfig,
    HaproxyError,
    RunPaths,
    SlotsExhausted,
    check_config,
    desired_state,
    diff_commands,
    render_config,
)
from pydstack.adapters.haproxy.config import MAPS
from pydstack.core.gateway import Instance, PortPolicy, PortRule, RoutingTable

GOLDEN = Path(__file__).parent / "golden" / "haproxy.cfg"
PATHS = RunPaths.under(Path("/run/pydstack-haproxy"))
CONFIG = HaproxyConfig(host="0.0.0.0", port=443, pp_slots=2, max_connections_per_app=500)
NOW = 1_000_000.0


def test_config_matches_golden() -> None:
    """The rendered config is exactly the reviewed golden file."""
    text = render_config(CONFIG, PATHS)
    if os.environ.get("PYDSTACK_REGEN_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs Debian's haproxy")
def test_rendered_config_is_valid_and_broken_config_is_reported(tmp_path: Path) -> None:
    """`haproxy -c` accepts the rendered config; a broken one raises with HAProxy's alert."""
    paths = RunPaths.under(tmp_path)
    paths.certs.mkdir()
    pem = tmp_path / "certs" / "x.pem"
    # a crt-list may not be empty: use a throw-away certificate from the plane's helper
    from pydstack.adapters.haproxy.plane import _placeholder_pem

    pem.write_bytes(_placeholder_pem())
    paths.crt_list.write_text(f"{pem}\n")
    for name in MAPS:
        paths.map(name).write_text("")
    paths.config.write_text(render_config(HaproxyConfig(port=18443), paths))
    check_config(paths)
    paths.config.write_text(render_config(HaproxyConfig(port=18443), paths) + "\nbogus keyword\n")
    with pytest.raises(HaproxyError, match="bogus"):
        check_config(paths)


def _table(*instances: Instance) -> RoutingTable:
    return RoutingTable.build(instances, ["app.example.test"])


def test_state_names_freshest_instance_and_port_rules() -> None:
    """apps.map names the freshest instance within the stale window ('-' when none);
    ports.map holds every listed port, PROXY ones pointing at a slot of their version."""
    pp = PortPolicy(restrict=True, rules=(PortRule(80), PortRule(81, 1), PortRule(82, 2)))
    table = _table(
        Instance("i1", "app", "10.0.0.1", NOW - 10),
        Instance("i2", "app", "10.0.0.2", NOW - 5, pp),
        Instance("i3", "app", "10.0.0.3", NOW - 4000),
        Instance("s1", "stale", "10.0.0.4", NOW - 4000),
        Instance("n1", "never", "10.0.0.5", None),
    )
    state = desired_state(table, NOW, handshake_stale=1800, pp_slots=2)
    assert state.maps["apps"] == {"app": "i2", "stale": "-", "never": "-"}
    assert state.maps["instances"]["i2"] == "10.0.0.2|1|app"
    assert state.maps["instances"]["i1"] == "10.0.0.1|0|app"
    assert state.maps["ports"] == {"i2:80": "0", "i2:81": "pp1_0", "i2:82": "pp2_0"}
    assert {n: (t.ip, t.port) for n, t in state.slots.items()} == {
        "pp1_0": ("10.0.0.2", 81),
        "pp2_0": ("10.0.0.2", 82),
    }
    assert state.maps["bases"] == {"app.example.test": "1"}


def test_diff_touches_only_what_changed() -> None:
    """One new instance is one add; a moved IP is one set; a removal deletes app then
    instance; an unchanged table sends nothing."""
    one = _table(Instance("i1", "a", "10.0.0.1", NOW))
    s1 = desired_state(one, NOW)
    assert diff_commands(PATHS, s1, s1) == []
    two = _table(Instance("i1", "a", "10.0.0.1", NOW), Instance("j1", "b", "10.0.0.9", NOW))
    s2 = desired_state(two, NOW)
    m = PATHS.map
    assert diff_commands(PATHS, s1, s2) == [
        f"add map {m('instances')} j1 10.0.0.9|0|b",
        f"add map {m('apps')} b j1",
    ]
    moved = _table(Instance("i1", "a", "10.0.0.7", NOW), Instance("j1", "b", "10.0.0.9", NOW))
    assert diff_commands(PATHS, s2, desired_state(moved, NOW)) == [
        f"set map {m('instances')} i1 10.0.0.7|0|a"
    ]
    assert diff_commands(PATHS, s2, s1) == [
        f"del map {m('apps')} b",
        f"del map {m('instances')} j1",
    ]


def test_slots_are_stable_and_bounded() -> None:
    """A PROXY target keeps its slot when others come and go; a freed slot is parked in
    maintenance; more targets than slots is a clear error."""

    def inst(iid: str, ip: str) -> Instance:
        return Instance(iid, iid, ip, NOW, PortPolicy(rules=(PortRule(443, 2),)))

    s1 = desired_state(_table(inst("b", "10.0.0.2")), NOW, pp_slots=2)
    s2 = desired_state(
        _table(inst("a", "10.0.0.1"), inst("b", "10.0.0.2")), NOW, slots_before=s1.slots, pp_slots=2
    )
    assert s1.maps["ports"]["b:443"] == s2.maps["ports"]["b:443"] == "pp2_0"
    assert s2.maps["ports"]["a:443"] == "pp2_1"
    cmds = diff_commands(PATHS, s1, s2)
    assert cmds[:2] == [
        "set server pp2_1/s addr 10.0.0.1 port 443",
        "set server pp2_1/s state ready",
    ]
    s3 = desired_state(_table(inst("a", "10.0.0.1")), NOW, slots_before=s2.slots, pp_slots=2)
    assert s3.maps["ports"] == {"a:443": "pp2_1"}
    assert diff_commands(PATHS, s2, s3)[-1] == "set server pp2_0/s state maint"
    three = _table(inst("a", "10.0.0.1"), inst("b", "10.0.0.2"), inst("c", "10.0.0.3"))
    with pytest.raises(SlotsExhausted, match="pp_slots"):
        desired_state(three, NOW, pp_slots=2)


def test_values_that_would_break_a_map_line_are_refused() -> None:
    """An id with a space could smuggle a second map field: refused before HAProxy sees it."""
    with pytest.raises(ValueError, match="HAProxy map"):
        desired_state(_table(Instance("i1", "a b", "10.0.0.1", NOW)), NOW)
    with pytest.raises(ValueError, match="custom domain"):
        desired_state(_table(), NOW, custom_domains={"shop example": ("a", 443)})
