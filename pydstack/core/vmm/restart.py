"""dstack's auto-restart policy as a pure function of the recorded events and the time.

A VM that exits while it should run is restarted after a delay that starts at
``initial_backoff_s`` and doubles per attempt up to ``max_backoff_s``; after ``max_retries``
attempts the VMM gives up (``VmRestartExhausted``) until an operator starts it again. A run
that lasted ``reset_window_s`` resets the budget. The decision depends only on what the log
recorded (``RestartTrack``, folded by :mod:`.record`) and ``now_ns``, so a restarted VMM
decides exactly what the previous one would have::

    match decide_restart(track, now_ns, RestartPolicy()):
        case VmRestartScheduled() as e: ...  # append it
        case RestartNow(attempt=n): ...      # start the VM, VmStarted(attempt=n)
        case None: ...                       # nothing to do yet
"""

from __future__ import annotations

from msgspec import Struct

from pydstack.core.events import VmRestartExhausted, VmRestartScheduled

_S = 1_000_000_000


class RestartPolicy(Struct, frozen=True, kw_only=True):
    """dstack's defaults (``[cvm.auto_restart]`` in vmm.toml)."""

    enabled: bool = True
    interval_s: float = 20.0  # how often exited VMs are looked at
    initial_backoff_s: float = 5.0
    max_backoff_s: float = 300.0
    max_retries: int = 5
    reset_window_s: float = 300.0

    def delay_s(self, attempt: int) -> float:
        """The wait before restart ``attempt`` (1-based): 5, 10, 20 … capped."""
        return float(min(self.initial_backoff_s * 2 ** max(attempt - 1, 0), self.max_backoff_s))


class RestartTrack(Struct, frozen=True, kw_only=True):
    """What the log says about a VM's restarts since an operator last started or stopped it."""

    attempts: int = 0  # restart attempts scheduled so far
    due_ns: int = 0  # a scheduled restart not yet done (0: none)
    exhausted: bool = False
    started_ns: int = 0  # time of the last VmStarted
    exited_ns: int = 0  # time of the last VmExited
    last_run_ns: int = 0  # how long the last run lasted (exit - start)


class RestartNow(Struct, frozen=True, kw_only=True):
    attempt: int


RestartDecision = VmRestartScheduled | VmRestartExhausted | RestartNow | None


def decide_restart(
    vm_id: str, track: RestartTrack, now_ns: int, policy: RestartPolicy
) -> RestartDecision:
    """For a VM that exited and should run: schedule, restart now, give up, or wait."""
    if not policy.enabled:
        return None
    if track.due_ns:
        return RestartNow(attempt=track.attempts) if now_ns >= track.due_ns else None
    if track.exhausted:
        return None
    healthy = track.last_run_ns >= policy.reset_window_s * _S
    done = 0 if healthy else track.attempts
    if done >= policy.max_retries:
        return VmRestartExhausted(vm_id=vm_id, attempts=done)
    attempt = done + 1
    delay = policy.delay_s(attempt)
    return VmRestartScheduled(
        vm_id=vm_id, attempt=attempt, delay_ms=int(delay * 1000), due_ns=now_ns + int(delay * _S)
    )
