"""Seconds from the last of 1000 ``CvmRegistered`` until all 3 gateways hold identical tables
and WireGuard peer sets.

Three gateway node processes (``python -m pydstack.actors.gateway``), each in its own network
namespace with its own wireguard-go, follow a real nats-server; 4 concurrent writers register
1000 CVMs (keys only) through the registrar's atomic commits. The clock stops when every
node's admin endpoint reports the same table digest, a device peer set read back over UAPI
equal to the table's, and all 1000 peers. Goal: <= 1 s (dstack syncs every 30 s).
Needs root and wireguard-go. Last line: ``{"converge_s": ..., "errors", "error_rate", "ok"}``.
A registration refused, or nodes not identical within 60 s (``converge_s`` null), fails the
run (exit 1).

    python -m bench.converge [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import finish, parse_quick
from pydstack.actors.gateway import Registrar, RegistrarConfig
from pydstack.adapters.nats import EventStore, NatsServer, NatsServerConfig
from pydstack.adapters.wireguard import PrivateKey
from pydstack.core.events import Signer
from pydstack.core.gateway.cluster import AddressPlan, Admission, RegisterRequest
from tests.gateway_nodes.lan import namespace_lan
from tests.gateway_nodes.procs import NodeProc, node_argv

WRITERS = 4
BATCH = 32
CONVERGE_DEADLINE_S = 60.0  # not identical by then: the run fails (converge_s null)


def _request(i: int) -> RegisterRequest:
    return RegisterRequest(
        app_id=hashlib.sha1(b"app %d" % (i % 50)).hexdigest(),
        instance_id=hashlib.sha1(b"instance %d" % i).hexdigest(),
        compose_hash=hashlib.sha256(b"compose %d" % (i % 50)).hexdigest(),
        wg_public_key=PrivateKey.generate().public_key().b64,
    )


async def _converged(nodes: list[NodeProc], n: int) -> list[dict[str, Any]] | None:
    statuses = await asyncio.gather(*(node.status() for node in nodes))
    ok = (
        len({s["table_digest"] for s in statuses}) == 1
        and len({s["device_peer_digest"] for s in statuses}) == 1
        and all(s["in_sync"] and s["peers"] == n for s in statuses)
    )
    return list(statuses) if ok else None


async def run(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pydstack-converge-") as tmp_s:
        tmp = Path(tmp_s)
        async with namespace_lan() as lan:
            server = NatsServer(NatsServerConfig(data_dir=tmp / "nats", host=lan.host_ip))
            await server.start()
            store = await EventStore.connect(
                server.url, Signer.from_private_bytes("bench", os.urandom(32))
            )
            await store.ensure_stream()
            nodes: list[NodeProc] = []
            try:
                for k in (1, 2, 3):
                    addr = await lan.add(f"gw{k}")
                    argv = node_argv(
                        f"gw{k}", lan.ns(f"gw{k}"), addr, nats_url=server.url,
                        state_dir=tmp / f"gw{k}", base_domain="bench.test",
                        tunnel_net=lan.tunnel_net, client_range=lan.client_range,
                        tunnel_ip=lan.node_ip(k),
                    )  # fmt: skip
                    nodes.append(NodeProc(f"gw{k}", lan.ns(f"gw{k}"), addr, argv, tmp / f"{k}.log"))
                await asyncio.gather(*(node.start() for node in nodes))
                plan = AddressPlan(lan.client_range)
                regs = [
                    Registrar(store, RegistrarConfig(node_id=f"gw{1 + w % 3}", plan=plan))
                    for w in range(WRITERS)
                ]
                requests = [_request(i) for i in range(n)]
                last_landed = 0.0
                refused: list[str] = []  # every registration not admitted, in words

                async def writer(w: int) -> None:
                    nonlocal last_landed
                    mine = requests[w::WRITERS]
                    for k in range(0, len(mine), BATCH):
                        outs = await regs[w].register_many(mine[k : k + BATCH])
                        refused.extend(str(o) for o in outs if not isinstance(o, Admission))
                        last_landed = max(last_landed, time.perf_counter())

                t0 = time.perf_counter()
                await asyncio.gather(*(writer(w) for w in range(WRITERS)))
                registered_s = last_landed - t0
                want = n - len(refused)  # what the nodes can hold; any refusal fails the run
                statuses = None
                deadline = time.perf_counter() + CONVERGE_DEADLINE_S
                while statuses is None and time.perf_counter() < deadline:
                    with contextlib.suppress(Exception):
                        statuses = await _converged(nodes, want)
                    if statuses is None:
                        await asyncio.sleep(0.005)
                converged = time.perf_counter()
                for r in regs:
                    await r.aclose()
                for why in sorted(set(refused))[:5]:
                    print(f"refused: {why}", file=sys.stderr)
                return {
                    # null: not converged within CONVERGE_DEADLINE_S (the run fails)
                    "converge_s": round(converged - last_landed, 3) if statuses else None,
                    "registrations": n,
                    "refused": len(refused),
                    "nodes": len(nodes),
                    "register_s": round(registered_s, 3),
                    "registrations_per_s": round(n / registered_s, 1),
                    "table_digest": statuses[0]["table_digest"] if statuses else None,
                    "goal_s": 1.0,
                }
            finally:
                for node in nodes:
                    await node.stop()
                await store.nc.close()
                await server.stop()


def main() -> None:
    quick = parse_quick(__doc__)
    result = asyncio.run(run(200 if quick else 1000))
    converged = result["converge_s"] is not None
    print(
        f"{result['registrations']} registrations in {result['register_s']} s; 3 gateways "
        + (f"identical (table + WireGuard peers) {result['converge_s']} s after the last"
           if converged else f"NOT identical {CONVERGE_DEADLINE_S} s after the last")
    )  # fmt: skip
    status = finish(result, errors=result["refused"], attempts=result["registrations"],
                    what="bench.converge registrations")  # fmt: skip
    raise SystemExit(status or (0 if converged else 1))


if __name__ == "__main__":
    main()
