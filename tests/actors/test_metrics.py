"""The /metrics endpoint serves the actor metrics in Prometheus text format."""

from __future__ import annotations

import asyncio
import urllib.request

from pydstack.actors import metrics
from pydstack.adapters.nats import free_port


async def test_metrics_endpoint_serves_actor_counters() -> None:
    metrics.MALFORMED.labels("metrics-test", "not_msgpack").inc()
    port = free_port()
    stop = metrics.serve_metrics(port)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    finally:
        stop()
    text = body.decode()
    assert 'pydstack_actor_malformed_total{actor="metrics-test",reason="not_msgpack"} 1.0' in text
    assert "# TYPE pydstack_actor_lag gauge" in text
