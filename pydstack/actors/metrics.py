"""Prometheus metrics shared by every actor, labelled by actor name.

The metrics live in prometheus_client's default registry (defining them does no I/O);
:func:`serve_metrics` exposes them on ``/metrics``. Usage::

    stop = serve_metrics(9464)   # http://127.0.0.1:9464/metrics
    ...
    stop()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from prometheus_client import REGISTRY, Counter, Gauge, start_http_server

HANDLED: Final = Counter(
    "pydstack_actor_handled", "Events handled and acked by an actor.", ["actor"]
)
ERRORS: Final = Counter(
    "pydstack_actor_errors",
    "Failures of an actor: handler (redelivered later), reconcile, fetch.",
    ["actor", "kind"],
)
MALFORMED: Final = Counter(
    "pydstack_actor_malformed",
    "Messages an actor skipped because they are not valid pydstack events.",
    ["actor", "reason"],
)
REFUSED: Final = Counter(
    "pydstack_events_refused",
    "Stored events a fold skipped because the write policy refuses them (bad signature, "
    "unknown or revoked signer, a role or host writing what it may not), once per event.",
    ["actor", "reason"],
)
RECONCILES: Final = Counter(
    "pydstack_actor_reconciles", "Reconcile passes an actor completed.", ["actor"]
)
LAG: Final = Gauge(
    "pydstack_actor_lag",
    "Events on the actor's subjects not yet handled (consumer pending + unacked).",
    ["actor"],
)
LAST_SEQ: Final = Gauge(
    "pydstack_actor_last_seq", "Stream sequence of the last event the actor handled.", ["actor"]
)
DECISIONS: Final = Counter(
    "pydstack_scheduler_decisions",
    "Scheduler outcomes: scheduled, rejected, conflict (lost an OCC race and retried).",
    ["actor", "outcome"],
)


def sample(name: str, labels: dict[str, str]) -> float:
    """Current value of one sample (0 when it was never set); handy for tests and status."""
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def serve_metrics(port: int, host: str = "127.0.0.1") -> Callable[[], None]:
    """Serve ``/metrics`` from a background thread; returns the function that stops it."""
    server, thread = start_http_server(port, addr=host)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
