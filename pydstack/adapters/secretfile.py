"""Secret files (private keys, seeds, tokens, ``appkeys.json``): mode 0600 from their first
byte, whatever the umask, and never half written. Usage::

    write_secret(path, key_pem)                   # creates or atomically replaces
    write_secret(path, seed, overwrite=False)     # FileExistsError when one is there

The data goes to a new temporary file beside ``path``, created 0600 with ``O_EXCL`` (no file an
attacker prepared is reused, no symlink followed) and ``fchmod``-ed to exactly 0600, fsynced,
then renamed over ``path`` (``os.replace``: a file that was 0644 is replaced by a 0600 one, never
rewritten in place), or, with ``overwrite=False``, hard-linked to it (``os.link`` fails when
``path`` exists, so of two creators one wins and the other sees ``FileExistsError``). A parent
directory that does not exist yet is created 0700.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

SECRET_MODE = 0o600
SECRET_DIR_MODE = 0o700


def private_dir(directory: Path) -> None:
    """``directory`` and its parents; the directory itself 0700 when this call creates it."""
    if directory.is_dir():
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir(mode=SECRET_DIR_MODE)
    except FileExistsError:
        return
    os.chmod(directory, SECRET_DIR_MODE)  # the umask can narrow mkdir's mode to unusable


def write_secret(
    path: str | os.PathLike[str], data: bytes | str, *, overwrite: bool = True
) -> Path:
    """Write ``data`` to ``path`` as a 0600 file (see the module doc); returns the path."""
    path = Path(path)
    blob = data.encode() if isinstance(data, str) else bytes(data)
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, SECRET_MODE)
    try:
        try:
            _fill(fd, blob)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path, blob)
        _sync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _link_new(tmp: Path, path: Path, blob: bytes) -> None:
    try:
        os.link(tmp, path)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # A filesystem without hard links (some shares): exclusive create, still 0600 first.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, SECRET_MODE)
        try:
            _fill(fd, blob)
        finally:
            os.close(fd)


def _fill(fd: int, blob: bytes) -> None:
    os.fchmod(fd, SECRET_MODE)  # exactly 0600: a umask like 0o777 would leave it unreadable
    view = memoryview(blob)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _sync_dir(directory: Path) -> None:
    """The rename or link itself survives a crash (best effort: not every filesystem can)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
