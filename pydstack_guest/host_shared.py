"""The host-shared directory as dstack v0.5.11 names and bounds it (dstack-types
``shared_filenames``, dstack-util ``HostShared::copy``), read by the guest's boot.

Files (all host-written, so untrusted; only the app-compose is measured):

=====================  ========  ======================================================
``app-compose.json``   256 KiB   required; its sha256 is the compose hash
``.sys-config.json``   32 KiB    required by dstack; here ``{}`` when absent
``.instance_info``     10 KiB    ``{"instance_id_seed","instance_id","app_id"}`` (hex)
``.encrypted-env``     256 KiB   raw bytes (X25519 + AES-GCM, dstack's format)
``.user-config``       1 MiB     opaque text for the app
=====================  ========  ======================================================

Each is read once, without following a symlink (dstack opens with ``O_NOFOLLOW``), and one
over its bound fails the boot naming it, as dstack's copy does. Work dirs written before the
dotted names (pydstack's ``sys-config.json``, ``instance-info.json``, ``encrypted-env``,
``user-config``) are still read when the dstack name is absent. ``.appkeys.json`` is not a
host file: dstack's guest writes it into its private copy of this directory; the keys stay in
the guest here (`pydstack_guest.provider` reads dstack's format).

    shared = read_host_shared(Path("/dstack/.host-shared"))
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Final

import msgspec

APP_COMPOSE: Final = "app-compose.json"
APP_KEYS: Final = ".appkeys.json"
SYS_CONFIG: Final = ".sys-config.json"
USER_CONFIG: Final = ".user-config"
ENCRYPTED_ENV: Final = ".encrypted-env"
INSTANCE_INFO: Final = ".instance_info"
KIB: Final = 1024
# dstack name -> (bound in bytes, the name pydstack wrote before)
FILES: Final = {
    APP_COMPOSE: (256 * KIB, APP_COMPOSE),
    SYS_CONFIG: (32 * KIB, "sys-config.json"),
    INSTANCE_INFO: (10 * KIB, "instance-info.json"),
    ENCRYPTED_ENV: (256 * KIB, "encrypted-env"),
    USER_CONFIG: (1024 * KIB, "user-config"),
}


class BootFailed(Exception):
    """A boot step failed; `step` names it and the message says what is wrong."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"boot error at {step}: {reason}")
        self.step, self.reason = step, reason


class HostShared(msgspec.Struct, frozen=True, kw_only=True):
    """The raw host-shared files."""

    app_compose: bytes
    sys_config: bytes = b"{}"
    instance_info: bytes = b"{}"
    encrypted_env: bytes = b""
    user_config: str = ""


def _read_bounded(path: Path, limit: int) -> bytes | None:
    """The file's bytes; None when absent. A symlink or a file over `limit` fails the boot."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BootFailed("host-shared", f"{path.name} is a symlink (not followed)") from None
        raise BootFailed("host-shared", f"{path.name}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BootFailed(
            "host-shared", f"{path.name} is larger than {limit} bytes (dstack's bound)"
        )
    return data


def read_file(shared: Path, name: str) -> bytes | None:
    """One host-shared file by its dstack name (else by pydstack's earlier name)."""
    limit, old = FILES[name]
    data = _read_bounded(shared / name, limit)
    if data is None and old != name:
        data = _read_bounded(shared / old, limit)
    return data


def read_host_shared(shared: Path, app_compose: bytes | None = None) -> HostShared:
    """The host-shared files of a work dir; `app_compose` overrides ``app-compose.json``."""
    compose = app_compose if app_compose is not None else read_file(shared, APP_COMPOSE)
    if not compose:
        raise BootFailed("host-shared", f"no app-compose.json in {shared}")
    return HostShared(
        app_compose=compose, sys_config=read_file(shared, SYS_CONFIG) or b"{}",
        instance_info=read_file(shared, INSTANCE_INFO) or b"{}",
        encrypted_env=read_file(shared, ENCRYPTED_ENV) or b"",
        user_config=(read_file(shared, USER_CONFIG) or b"").decode(errors="replace"),
    )  # fmt: skip
