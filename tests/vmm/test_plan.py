"""The pure VMM plan and dstack's restart policy: given events and observations, the actions."""

from __future__ import annotations

from pydstack.core.events import (
    VmExited,
    VmRequested,
    VmResources,
    VmRestartExhausted,
    VmRestartScheduled,
    VmScheduled,
    VmStarted,
    VmStartRequested,
    VmStopRequested,
)
from pydstack.core.projections import Applied
from pydstack.core.vmm import (
    Adopt,
    Append,
    Discard,
    Observed,
    RecordExited,
    RestartPolicy,
    Start,
    Stop,
    VmRecord,
    plan,
    record,
)

S = 1_000_000_000
POLICY = RestartPolicy()  # dstack's defaults: 5 s doubling to 300 s, 5 retries, 300 s window


def fold(*events: tuple[int, object]) -> VmRecord:
    rec = None
    for seq, (t, e) in enumerate(events, 1):
        rec = record.apply(rec, Applied(seq, t, e, f"e{seq}"))  # type: ignore[arg-type]
    assert rec is not None
    return rec


BASE = (
    (0, VmRequested(vm_id="v", app_id="a", name="v", resources=VmResources(vcpu=1, memory_mb=1))),
    (1, VmScheduled(vm_id="v", host="h", cid=1000)),
)


def test_scheduled_vm_is_started_and_a_running_one_adopted_not_restarted() -> None:
    rec = fold(*BASE)
    assert plan({"v": rec}, {}, now_ns=2, policy=POLICY) == [Start(vm_id="v")]
    live = fold(*BASE, (2, VmStarted(vm_id="v", host="h", pid=5)))
    running = {"v": Observed(vm_id="v", state="running", pid=5, cid=1000)}
    assert plan({"v": live}, running, now_ns=3, policy=POLICY) == []
    # The VMM crashed between starting and recording: the running CVM is adopted.
    assert plan({"v": rec}, running, now_ns=3, policy=POLICY) == [Adopt(vm_id="v", pid=5)]


def test_exit_is_recorded_and_restarted_at_once_only_when_recovering() -> None:
    live = fold(*BASE, (2, VmStarted(vm_id="v", host="h", pid=5)))
    gone = {"v": Observed(vm_id="v", state="exited", exit_code=-9, reason="killed")}
    assert plan({"v": live}, gone, now_ns=3, policy=POLICY) == [
        RecordExited(vm_id="v", reason="killed", exit_code=-9)
    ]
    assert plan({"v": live}, {}, now_ns=3, policy=POLICY, recovering=True)[1:] == [Start(vm_id="v")]


def test_restart_backoff_doubles_caps_and_exhausts() -> None:
    events = [*BASE, (2 * S, VmStarted(vm_id="v", host="h"))]
    t, delays = 3 * S, []
    for attempt in range(1, 6):
        events.append((t, VmExited(vm_id="v", reason="crash")))
        [action] = plan({"v": fold(*events)}, {}, now_ns=t, policy=POLICY)
        assert isinstance(action, Append)
        e = action.event
        assert isinstance(e, VmRestartScheduled) and e.attempt == attempt
        delays.append(e.delay_ms)
        events.append((t, e))
        assert plan({"v": fold(*events)}, {}, now_ns=e.due_ns - 1, policy=POLICY) == []
        assert plan({"v": fold(*events)}, {}, now_ns=e.due_ns, policy=POLICY) == [
            Start(vm_id="v", attempt=attempt)
        ]
        t = e.due_ns + S
        events.append((t, VmStarted(vm_id="v", host="h", attempt=attempt)))
        t += S
    assert delays == [5000, 10000, 20000, 40000, 80000]
    events.append((t, VmExited(vm_id="v", reason="crash")))
    assert plan({"v": fold(*events)}, {}, now_ns=t, policy=POLICY) == [
        Append(event=VmRestartExhausted(vm_id="v", attempts=5))
    ]
    events.append((t, VmRestartExhausted(vm_id="v", attempts=5)))
    assert plan({"v": fold(*events)}, {}, now_ns=t + 10**6 * S, policy=POLICY) == []
    events.append((t + S, VmStartRequested(vm_id="v")))  # an operator start resets the budget
    assert plan({"v": fold(*events)}, {}, now_ns=t + 2 * S, policy=POLICY) == [Start(vm_id="v")]


def test_a_healthy_run_resets_the_budget() -> None:
    events = [*BASE, (0, VmStarted(vm_id="v", host="h"))]
    events += [(S, VmExited(vm_id="v", reason="x")),
               (S, VmRestartScheduled(vm_id="v", attempt=4, delay_ms=1, due_ns=S))]  # fmt: skip
    events += [(2 * S, VmStarted(vm_id="v", host="h", attempt=4)),
               (400 * S, VmExited(vm_id="v", reason="x"))]  # ran 398 s > 300 s  # fmt: skip
    [action] = plan({"v": fold(*events)}, {}, now_ns=400 * S, policy=POLICY)
    assert isinstance(action, Append)
    e = action.event
    assert isinstance(e, VmRestartScheduled) and (e.attempt, e.delay_ms) == (1, 5000)


def test_stop_and_orphans() -> None:
    stop = VmStopRequested(vm_id="v", force=True)
    rec = fold(*BASE, (2, VmStarted(vm_id="v", host="h")), (3, stop))
    running = {"v": Observed(vm_id="v", state="running"), "x": Observed(vm_id="x", state="running")}
    assert plan({"v": rec}, running, now_ns=4, policy=POLICY) == [
        Stop(vm_id="v", force=True), Discard(vm_id="x"),
    ]  # fmt: skip
