"""The guest egress table and the gateway's forwarding guard, applied and removed with the
``nft`` binary (nftables).

Usage::

    fw = GuestEgress(uid)                 # netns=Path("/var/run/netns/x"): apply it there
    await fw.apply(HostServices(kms=(9100,)))   # replaces the table atomically
    await fw.remove()
    guard = ForwardGuard("dgw0")          # a gateway's tunnel forwards nothing
    await guard.apply(); ...; await guard.remove()
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from .rules import (
    TABLE,
    HostServices,
    forward_guard,
    forward_guard_removal,
    forward_table,
    removal,
    ruleset,
)


class FirewallError(Exception):
    """nft refused or is missing; one line, what is wrong and what to do."""


def unavailable_reason() -> str | None:
    """Why guest egress rules cannot be applied here (None: they can)."""
    if os.geteuid() != 0:
        return ("the QEMU backend needs root: it runs QEMU as its own user behind nftables "
                "rules; run it as root, or use the sandbox backend")  # fmt: skip
    if shutil.which("nft") is None:
        return ("nft not found: install nftables (make sysdeps); its rules keep QEMU guests "
                "away from this host's services")  # fmt: skip
    return None


class GuestEgress:
    """The table for one QEMU user, in this process's network namespace or in ``netns``."""

    def __init__(self, uid: int, *, netns: Path | None = None) -> None:
        self.uid = uid
        self.netns = netns

    async def _run(self, *args: str, stdin: str = "") -> str:
        return await _nft(self.netns, *args, stdin=stdin)

    async def apply(self, services: HostServices) -> None:
        await self._run("-f", "-", stdin=ruleset(self.uid, services))

    async def remove(self) -> None:
        await self._run("-f", "-", stdin=removal())

    async def listed(self) -> str:
        """The table as nft lists it ("" when absent)."""
        try:
            return await self._run("list", "table", "inet", TABLE)
        except FirewallError:
            return ""


class ForwardGuard:
    """The forwarding guard of a gateway's WireGuard interface (`rules.forward_guard`), in
    this process's network namespace or in ``netns``."""

    def __init__(self, ifname: str, *, netns: Path | None = None) -> None:
        self.ifname, self.netns = ifname, netns
        self.table = forward_table(ifname)

    async def apply(self) -> None:
        await _nft(self.netns, "-f", "-", stdin=forward_guard(self.ifname))

    async def remove(self) -> None:
        await _nft(self.netns, "-f", "-", stdin=forward_guard_removal(self.ifname))

    async def listed(self) -> str:
        try:
            return await _nft(self.netns, "list", "table", "inet", self.table)
        except FirewallError:
            return ""


async def _nft(netns: Path | None, *args: str, stdin: str = "") -> str:
    nft = ["nft", *args]
    argv = ["nsenter", f"--net={netns}", *nft] if netns else nft
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except FileNotFoundError as exc:
        raise FirewallError(f"{exc.filename}: not found (install nftables)") from None
    out, err = await proc.communicate(stdin.encode())
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines() or ["(no message)"]
        raise FirewallError(f"nft {' '.join(args)}: {lines[0]}")
    return out.decode()


def processes_of(uid: int, proc: Path = Path("/proc")) -> list[int]:
    """Live pids whose real uid is ``uid`` (a QEMU the rules still protect the host from);
    zombies do not count (an adopted QEMU's is reaped by init, whenever that happens)."""
    out = []
    for d in proc.iterdir():
        if d.name.isdigit():
            try:
                status = dict(x.split(":", 1) for x in (d / "status").read_text().splitlines())
            except (OSError, ValueError):
                continue
            state, uids = status.get("State", "").split(), status.get("Uid", "").split()
            if uids and int(uids[0]) == uid and state[:1] not in (["Z"], ["X"]):
                out.append(int(d.name))
    return out
