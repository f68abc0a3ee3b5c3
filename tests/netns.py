"""Network namespaces a test makes for itself, so firewall rules and traffic never touch the
machine's own network (PLATFORM.md's traffic rule). Processes started from a thread that
entered one (``entered``) run in it too: QEMU, the supervisor, `up`, nft.

Usage::

    with Netns.create("egress") as ns:
        ns.ip("addr", "add", "10.99.0.1/24", "dev", "lo")
        with entered(ns):          # this thread, until the block ends
            subprocess.run(["nft", "list", "ruleset"])
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
from collections.abc import Iterator

from pydstack.adapters.sandbox import _netns

CLONE_NEWNET = 0x40000000


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name
        self.path = _netns.path_of(name)

    @classmethod
    def create(cls, prefix: str) -> Netns:
        """A fresh namespace ``pdt-<prefix>-<random>`` with loopback up."""
        ns = cls(f"pdt-{prefix}-{secrets.token_hex(3)}")
        _netns.ensure(ns.name)
        return ns

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True)

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run inside this namespace (nsenter keeps the mount namespace: /sys too)."""
        return ["nsenter", f"--net={self.path}", *argv]

    def close(self) -> None:
        """Kill whatever still runs inside, then delete it."""
        _netns.kill_all(self.name)
        _netns.delete(self.name)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(ns: Netns) -> Iterator[None]:
    """The calling thread in ``ns`` for the block, then back where it was."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(ns.path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)
