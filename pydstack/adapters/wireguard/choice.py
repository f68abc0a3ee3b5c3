"""Which WireGuard backend a host uses: a pure rule over probe answers, and the probe.

``choose_backend(wanted, kernel=..., userspace=...)`` is the whole rule (``--wg-backend
auto|kernel|userspace``). Each answer is ``None`` when that backend can run here, else a
one-line reason why not:

- ``auto``: the kernel's WireGuard when it works (faster, no process per device), else
  wireguard-go, and the reason says why not the kernel; neither: refused, naming both;
- ``kernel`` / ``userspace``: that backend, or refused with its reason.

``pick_backend`` asks the backends themselves (the kernel one creates a throw-away
``wireguard`` link in a scratch network namespace, which also loads the module where it is
loadable; wireguard-go is looked for on PATH) and returns the chosen backend with the choice::

    backend, choice = await pick_backend("auto", run_dir=state_dir / "wg")
    choice.backend, choice.reason   # ("userspace", "auto: no wireguard kernel module: ...")

>>> choose_backend("auto", kernel=None, userspace=None).backend
'kernel'
>>> choose_backend("auto", kernel="no wireguard kernel module", userspace=None).reason
'auto: no wireguard kernel module; wireguard-go'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from .device import WireGuardBackend
from .errors import BackendUnavailable
from .kernel import KernelBackend
from .userspace import UserspaceBackend

Wanted = Literal["auto", "kernel", "userspace"]
WANTED: Final[tuple[Wanted, ...]] = ("auto", "kernel", "userspace")
Name = Literal["kernel", "userspace"]


@dataclass(frozen=True, slots=True)
class BackendChoice:
    backend: Name
    reason: str  # one line: why this backend (for auto: why not the kernel's)


def choose_backend(wanted: Wanted, *, kernel: str | None, userspace: str | None) -> BackendChoice:
    """The backend for ``wanted``; raises ``BackendUnavailable`` naming what is missing."""
    if wanted == "kernel":
        if kernel is not None:
            raise BackendUnavailable(f"--wg-backend kernel: {kernel}")
        return BackendChoice("kernel", "asked for (--wg-backend kernel)")
    if wanted == "userspace":
        if userspace is not None:
            raise BackendUnavailable(f"--wg-backend userspace: {userspace}")
        return BackendChoice("userspace", "asked for (--wg-backend userspace): wireguard-go")
    if kernel is None:
        return BackendChoice("kernel", "auto: the kernel has WireGuard")
    if userspace is None:
        return BackendChoice("userspace", f"auto: {kernel}; wireguard-go")
    raise BackendUnavailable(f"no WireGuard backend on this host: kernel: {kernel}; userspace: "
                             f"{userspace}")  # fmt: skip


async def pick_backend(
    wanted: Wanted, *, run_dir: Path, binary: str = "wireguard-go"
) -> tuple[WireGuardBackend, BackendChoice]:
    """Probe what ``wanted`` depends on, choose, and return that backend ready to create
    devices (``run_dir``: where wireguard-go's sockets go, if it is chosen)."""
    kernel_backend = KernelBackend()
    userspace_backend = UserspaceBackend(run_dir, binary=binary)
    kernel = await kernel_backend.unavailable_reason() if wanted != "userspace" else "not probed"
    userspace = await userspace_backend.unavailable_reason() if wanted != "kernel" else None
    choice = choose_backend(wanted, kernel=kernel, userspace=userspace)
    return (kernel_backend if choice.backend == "kernel" else userspace_backend), choice
