"""``pydstack service unit | install | uninstall``: `pydstack up` kept alive by systemd.

`up` rides out crashes of what it starts (pydstack.upkeep); systemd rides out crashes of `up`
itself. The unit restarts it on failure (a non-zero exit, a signal, the OOM killer), a bounded
number of times in a window, like `up`'s own restart budget. Its choices:

- ``KillMode=process``: a stop signals `up` only. `up` stops its nats-server and actors in
  order on SIGTERM; the supervisor and the CVMs it runs outlive `up` by design (the next `up`
  adopts them), which systemd's default (kill the whole cgroup) would defeat. An `up` killed
  without its cleanup leaves its nats-server running: the next `up` stops that one first
  (``upkeep.orphaned_nats_server``).
- ``ExecStart`` is this installation's own `pydstack` with an absolute data dir, so the unit
  does not depend on the working directory or $PATH of whoever installed it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

from pydstack.controlplane import DataDir

UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_NAME = "pydstack"
RESTART_BURST = 5  # restarts of `up` ...
RESTART_WINDOW_S = 300  # ... within this many seconds, then systemd leaves it failed
_SAFE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.,/:=@+")


class UnitError(ValueError):
    pass


def systemd_word(arg: str) -> str:
    """One ExecStart argument, quoted as systemd.service(5) reads it: specifiers (%) and
    variables ($) doubled, quotes and backslashes escaped. Control characters (a newline would
    start a new unit directive) are refused."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in arg):
        raise UnitError(f"argument {arg!r} has a control character")
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if arg and set(arg) <= _SAFE:
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unit_name(name: str) -> str:
    if not name or set(name) - set("abcdefghijklmnopqrstuvwxyz0123456789-_") or len(name) > 64:
        raise UnitError(f"unit name {name!r}: use 1-64 of a-z, 0-9, '-', '_'")
    return name


def render_unit(executable: str, data_dir: Path, up_args: tuple[str, ...]) -> str:
    """The unit file's text (pure)."""
    command = [executable, "up", "--data-dir", str(data_dir), "--log-json", *up_args]
    return "\n".join([
        "[Unit]",
        f"Description=pydstack control plane ({data_dir})",
        "After=network-online.target",
        "Wants=network-online.target",
        f"StartLimitIntervalSec={RESTART_WINDOW_S}",
        f"StartLimitBurst={RESTART_BURST}",
        "",
        "[Service]",
        "Type=exec",
        "ExecStart=" + " ".join(systemd_word(a) for a in command),
        "Restart=on-failure",
        "RestartSec=2",
        "# `up` stops nats-server and its actors on SIGTERM; the supervisor and its CVMs outlive",
        "# it by design (the next `up` adopts them): signal `up` alone (pydstack/cli/service.py)",
        "KillMode=process",
        "TimeoutStopSec=60",
        "Environment=PYTHONUNBUFFERED=1",
        "LimitNOFILE=65536",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])  # fmt: skip


def _executable() -> str:
    """This installation's `pydstack` (the venv's entry point next to its python)."""
    beside = Path(sys.executable).parent / "pydstack"
    found = str(beside) if beside.exists() else shutil.which("pydstack")
    if not found:
        raise click.ClickException("cannot find the `pydstack` executable of this installation")
    return str(Path(found).absolute())


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()  # sd_booted(3)


def _unit(ctx: click.Context, name: str, up_args: tuple[str, ...]) -> tuple[str, str]:
    data_dir = DataDir.resolve(ctx.obj.data_dir if ctx.obj else None).path
    try:
        return f"{_unit_name(name)}.service", render_unit(_executable(), data_dir, up_args)
    except UnitError as exc:
        raise click.ClickException(str(exc)) from None


_NAME = click.option("--name", default=DEFAULT_NAME, show_default=True, help="unit name")
_UP_ARGS = click.argument("up_args", nargs=-1, type=click.UNPROCESSED)


@click.group("service")
def service() -> None:
    """Run `pydstack up` under systemd, restarted on failure."""


@service.command("unit")
@_NAME
@_UP_ARGS
@click.option("--json", "as_json", is_flag=True, help="the unit's name and text as JSON")
@click.pass_context
def unit_cmd(ctx: click.Context, name: str, up_args: tuple[str, ...], as_json: bool) -> None:
    """Print the unit file for `up` on this data dir; UP_ARGS (after --) go to `up`.

    Example: pydstack --data-dir /var/lib/pydstack service unit -- --vmm qemu --gateway
    """
    file_name, text = _unit(ctx, name, up_args)
    click.echo(json.dumps({"name": file_name, "unit": text}) if as_json else text, nl=as_json)


@service.command("install")
@_NAME
@_UP_ARGS
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path), default=UNIT_DIR,
              show_default=True, help="where to write the unit")  # fmt: skip
@click.option("--no-start", is_flag=True, help="write and enable the unit, do not start it")
@click.pass_context
def install_cmd(
    ctx: click.Context, name: str, up_args: tuple[str, ...], unit_dir: Path, no_start: bool
) -> None:
    """Write the unit, then enable and start it when systemd runs this machine."""
    file_name, text = _unit(ctx, name, up_args)
    path = unit_dir / file_name
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)  # whatever the umask: systemd reads it as any user
            f.write(text)
        tmp.replace(path)  # whole or not at all
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror}") from None
    click.echo(f"wrote {path}")
    if not _systemd_running() or unit_dir != UNIT_DIR:
        click.echo(f"systemd does not run this machine (or --unit-dir): start it with "
                   f"`systemctl daemon-reload && systemctl enable --now {file_name}`")  # fmt: skip
        return
    steps = [["systemctl", "daemon-reload"],
             ["systemctl", "enable", *([] if no_start else ["--now"]), file_name]]  # fmt: skip
    for step in steps:
        r = subprocess.run(step, capture_output=True, text=True)
        if r.returncode != 0:
            raise click.ClickException(f"{' '.join(step)}: {r.stderr.strip() or r.returncode}")
    click.echo(f"{file_name} enabled" + ("" if no_start else " and started"))


@service.command("uninstall")
@_NAME
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path), default=UNIT_DIR,
              show_default=True)  # fmt: skip
def uninstall_cmd(name: str, unit_dir: Path) -> None:
    """Stop and disable the unit (when systemd runs) and remove its file."""
    try:
        file_name = f"{_unit_name(name)}.service"
    except UnitError as exc:
        raise click.ClickException(str(exc)) from None
    if _systemd_running() and unit_dir == UNIT_DIR:
        subprocess.run(["systemctl", "disable", "--now", file_name], capture_output=True)
    path = unit_dir / file_name
    if not path.exists():
        raise click.ClickException(f"no unit {path}")
    path.unlink()
    click.echo(f"removed {path}")
