"""QEMU's own unprivileged user, and the files of a CVM it may use: those, and nothing more.

QEMU runs as ``pydstack-qemu``, a system user with no home and no shell, created on first use
(``useradd --system``) by the VMM's QEMU backend. So the host firewall can tell a guest's
traffic apart (``adapters.firewall``), and a guest that breaks out into QEMU is no root and
reads none of the data dir's keys (0600/0700, root's). Per CVM work dir::

    <wd>/         root:<its group> 0750   enter and read, never write: the VMM's and the
                                          supervisor's files there stay theirs
    run/          its own, 0700           the QMP socket (QEMU creates it)
    disk.qcow2, data.qcow2, serial.log, events.log   its own, 0600
    shared/       root:<its group>, dirs 0750 files 0640 (0770/0660 if the share is writable)

A directory above the work dir or an image file that it cannot enter yet gets a POSIX ACL
entry for that user alone, search only (``setfacl -m u:<uid>:x``; ``/root`` holds the default
image cache); an image file it cannot read gets read. What it may do is always checked as
that user (``test -x`` / ``-r`` in a child running as it), so ACLs and masks count as they are.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import structlog

from pydstack.adapters.supervisor import RunAs

QEMU_USER: Final = "pydstack-qemu"
_OWN_FILES: Final = ("disk.qcow2", "data.qcow2", "serial.log", "events.log")

_log = structlog.get_logger("pydstack.qemu")


class AccessError(Exception):
    """QEMU's user cannot be made or given its files; one line naming the fix."""


def ensure_user(name: str = QEMU_USER) -> RunAs:
    """The user's ids, creating it (and its group) first when missing; plus group ``kvm`` if
    the host has one (``/dev/kvm``, ``/dev/vhost-vsock``)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        argv = ["useradd", "--system", "--user-group", "--no-create-home",
                "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]  # fmt: skip
        try:
            r = subprocess.run(argv, capture_output=True, text=True)
        except FileNotFoundError:
            raise AccessError(f"useradd not found: create the system user {name} "
                              "yourself (no home, no shell)") from None  # fmt: skip
        try:
            pw = pwd.getpwnam(name)  # also when a concurrent useradd won the race
        except KeyError:
            raise AccessError(f"cannot create user {name}: {r.stderr.strip()} (run as root, "
                              "or create it: useradd --system --user-group --no-create-home "
                              f"--shell /usr/sbin/nologin {name})") from None  # fmt: skip
        _log.info("created QEMU's user", user=name, uid=pw.pw_uid)
    if pw.pw_uid == 0:
        raise AccessError(f"user {name} is root: QEMU's user must be unprivileged")
    try:
        groups: tuple[int, ...] = (grp.getgrnam("kvm").gr_gid,)
    except KeyError:
        groups = ()
    return RunAs(uid=pw.pw_uid, gid=pw.pw_gid, groups=groups)


def prepare_workdir(wd: Path, who: RunAs, *, share_writable: bool) -> None:
    """Owners and modes of one work dir as in the module doc (idempotent)."""
    os.chown(wd, 0, who.gid)
    os.chmod(wd, 0o750)
    run = wd / "run"
    run.mkdir(exist_ok=True)
    os.chown(run, who.uid, who.gid, follow_symlinks=False)
    os.chmod(run, 0o700)
    for name in _OWN_FILES:  # the logs may not exist yet: QEMU appends to them, never creates
        fd = os.open(wd / name, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchown(fd, who.uid, who.gid)
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    dmode, fmode = (0o770, 0o660) if share_writable else (0o750, 0o640)
    shared = wd / "shared"
    if shared.is_dir() and not shared.is_symlink():
        for d, _, files in os.walk(shared):
            _share_entry(Path(d), dmode, who)
            for f in files:
                _share_entry(Path(d) / f, fmode, who)


def _share_entry(p: Path, mode: int, who: RunAs) -> None:
    st = os.lstat(p)
    if st.st_uid != 0 or p.is_symlink():
        return  # written by QEMU through a writable share: already its own
    os.chown(p, 0, who.gid, follow_symlinks=False)
    os.chmod(p, mode)


def grant_reach(who: RunAs, dirs: Iterable[Path], files: Iterable[Path]) -> list[str]:
    """Let ``who`` enter every directory from ``/`` down to each of ``dirs`` and to each
    file's directory, and read each of ``files``; returns what was granted (for the log)."""
    files = [Path(f) for f in files]
    chains = {a for d in [*dirs, *(f.parent for f in files)] for a in (Path(d), *Path(d).parents)}
    order = sorted(chains, key=lambda p: len(p.parts))
    granted: list[str] = []
    for _ in range(len(order) + 1):  # each round grants the shallowest directories it lacks
        missing = _denied(who, [("-x", d) for d in order])
        if not missing:
            break
        depth = min(len(p.parts) for p in missing)
        granted += _setfacl(who, "x", [p for p in missing if len(p.parts) == depth])
    else:
        raise AccessError(f"user {_name(who)} still cannot enter {missing[0]}")
    if unreadable := _denied(who, [("-r", f) for f in files]):
        granted += _setfacl(who, "r", unreadable)
        if still := _denied(who, [("-r", f) for f in unreadable]):
            raise AccessError(f"user {_name(who)} cannot read {still[0]}: give it read access")
    for g in granted:
        _log.info("granted QEMU's user access", user=_name(who), what=g)
    return granted


_CHECK: Final = 'while [ $# -gt 1 ]; do test "$1" "$2" || printf "%s\\0" "$2"; shift 2; done'


def _denied(who: RunAs, checks: list[tuple[str, Path]]) -> list[Path]:
    """The paths of ``checks`` that fail ``test <flag> <path>`` run as ``who``."""
    if not checks:
        return []
    args = [x for flag, p in checks for x in (flag, str(p))]
    r = subprocess.run(["/bin/sh", "-c", _CHECK, "sh", *args], capture_output=True, cwd="/",
                       user=who.uid, group=who.gid, extra_groups=list(who.groups))  # fmt: skip
    return [Path(p.decode()) for p in r.stdout.split(b"\0") if p]


def _setfacl(who: RunAs, perm: str, paths: list[Path]) -> list[str]:
    if shutil.which("setfacl") is None:
        raise AccessError(f"setfacl not found: install acl (make sysdeps), or let user "
                          f"{_name(who)} reach {paths[0]} yourself")  # fmt: skip
    r = subprocess.run(["setfacl", "-m", f"u:{who.uid}:{perm}", "--", *map(str, paths)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        why = r.stderr.strip() or "failed"
        raise AccessError(f"setfacl u:{_name(who)}:{perm} {paths[0]}: {why}; "
                          "give it that access yourself")  # fmt: skip
    return [f"{perm} on {p}" for p in paths]


def _name(who: RunAs) -> str:
    try:
        return pwd.getpwuid(who.uid).pw_name
    except KeyError:
        return str(who.uid)
