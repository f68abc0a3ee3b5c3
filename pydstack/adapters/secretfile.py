"""Secret files (private keys, seeds, tokens, ``appkeys.json``): mode 0600 from their first
byte, whatever the umask, and never half written. Usage::

    write_secret(path, key_pem)                   # creates or atomically replaces
    write_secret(path, seed, overwrite=False)     # FileExistsError when one is there
    seed = read_seed(path)                        # 32 bytes; SecretFileError if others can read

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
SEED_LEN = 32


class SecretFileError(ValueError):
    """A secret file that cannot be used; the message names the file and what to do."""


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


def read_secret(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a secret file only its owner may read (``SecretFileError`` otherwise: a
    secret others could read is no longer one)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SecretFileError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_mode & 0o077:
            raise SecretFileError(f"{path} is readable by others: chmod 600 it")
        return f.read()


def read_seed(path: str | os.PathLike[str]) -> bytes:
    """A 32-byte seed from a secret file: 32 raw bytes, or 64 hex digits (a newline may
    follow)."""
    raw = read_secret(path)
    if len(raw) == SEED_LEN:
        return raw
    text = raw.strip()
    if len(text) == 2 * SEED_LEN:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise SecretFileError(f"{path}: expected {SEED_LEN} raw bytes or {2 * SEED_LEN} hex digits")
