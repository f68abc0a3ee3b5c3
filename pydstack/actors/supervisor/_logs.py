"""Size-based rotation of logs that a child writes itself, by copy and truncate.

Children write straight to their log files (opened ``O_APPEND``), not through a pipe to the
supervisor, so they keep running and logging while the supervisor is down. Rotation therefore
cannot rename the file under the writer; it copies the file to ``.1`` (shifting older backups)
and truncates it in place. ``O_APPEND`` makes the writer's next line land at the new end. A
line written between the copy and the truncate is lost; that window is one copy long.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def backup_path(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate_if_large(path: Path, max_bytes: int, backups: int) -> bool:
    """Rotate ``path`` when it is larger than ``max_bytes``; True when it did.

    With ``backups == 0`` the file is only truncated.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if max_bytes <= 0 or size <= max_bytes:
        return False
    if backups > 0:
        backup_path(path, backups).unlink(missing_ok=True)
        for n in range(backups - 1, 0, -1):
            older = backup_path(path, n)
            if older.exists():
                older.rename(backup_path(path, n + 1))
        tmp = path.with_name(f"{path.name}.rotating")
        shutil.copyfile(path, tmp)
        tmp.rename(backup_path(path, 1))
    with path.open("r+b") as f:
        f.truncate(0)
    return True


def open_for_child(path: Path) -> int:
    """An ``O_APPEND`` descriptor for a child's stdout/stderr (the caller closes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
