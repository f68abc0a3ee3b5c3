"""`pydstack service`: the systemd unit that keeps `up` alive (issue 17 item 1). systemd does
not run these machines (no PID 1 to start units), so the unit is checked by systemd's own
parser (`systemd-analyze verify`) and the restart it asks for is exercised by
test_up_heal.py::test_up_killed_9_starts_again_on_its_data_dir (what systemd then does)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pydstack.cli.service import UnitError, render_unit, systemd_word

from .harness import PYDSTACK, cli

ANALYZE = shutil.which("systemd-analyze")


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE, "systemd-analyze (Debian systemd) is needed to check the unit"
    return subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_the_unit_restarts_up_on_failure_and_signals_only_up(tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = cli(home, "service", "unit", "--json", "--", "--vmm", "sandbox", "--gateway")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["name"] == "pydstack.service"
    lines = out["unit"].splitlines()
    exec_start = f"ExecStart={PYDSTACK} up --data-dir {home} --log-json --vmm sandbox --gateway"
    for line in (exec_start, "Restart=on-failure", "KillMode=process", "StartLimitBurst=5",
                 "StartLimitIntervalSec=300", "WantedBy=multi-user.target"):  # fmt: skip
        assert line in lines, (line, out["unit"])
    unit = tmp_path / "pydstack.service"
    unit.write_text(out["unit"])
    checked = _verify(unit)
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr


def test_systemd_analyze_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: the same verify refuses a unit whose ExecStart is relative."""
    text = render_unit("pydstack", tmp_path, ())  # not absolute: systemd refuses it
    unit = tmp_path / "broken.service"
    unit.write_text(text)
    assert _verify(unit).returncode != 0


def test_install_writes_the_unit_where_asked_and_uninstall_removes_it(tmp_path: Path) -> None:
    units = tmp_path / "units"
    r = cli(tmp_path / "home", "service", "install", "--unit-dir", str(units), "--name", "pds-a")
    assert r.code == 0, r.err
    path = units / "pds-a.service"
    assert path.stat().st_mode & 0o777 == 0o644
    assert "systemctl daemon-reload && systemctl enable --now pds-a.service" in r.out
    assert cli(tmp_path / "home", "service", "uninstall", "--unit-dir", str(units),
               "--name", "pds-a").code == 0  # fmt: skip
    assert not path.exists()


@pytest.mark.parametrize(
    ("arg", "word"),
    [
        ("/var/lib/pydstack", "/var/lib/pydstack"),
        ("/srv/my apps", '"/srv/my apps"'),
        ("100%", '"100%%"'),  # a specifier otherwise
        ("$HOME", '"$$HOME"'),  # a variable otherwise
        ('say "hi"\\', '"say \\"hi\\"\\\\"'),
        ("", '""'),
    ],
)
def test_arguments_are_quoted_as_systemd_reads_them(arg: str, word: str) -> None:
    assert systemd_word(arg) == word


@pytest.mark.parametrize("arg", ["a\nExecStartPre=/bin/rm -rf /", "tab\there", "\x7f"])
def test_control_characters_cannot_add_a_directive(arg: str, tmp_path: Path) -> None:
    with pytest.raises(UnitError, match="control character"):
        systemd_word(arg)
    r = cli(tmp_path / "home", "service", "unit", "--", "--host-id", arg)
    assert r.code == 1 and r.err.count("\n") == 1 and "control character" in r.err


def test_a_unit_name_outside_the_safe_set_is_refused(tmp_path: Path) -> None:
    r = cli(tmp_path / "home", "service", "install", "--unit-dir", str(tmp_path / "u"),
            "--name", "../../etc/evil")  # fmt: skip
    assert r.code == 1 and "unit name" in r.err
    assert not (tmp_path / "u").exists() or not any((tmp_path / "u").iterdir())
