"""The faults bench.chaos injects, one at a time: each kills one component with SIGKILL and
brings back what only an operator or the OS would bring back (a NATS node, an `up` restarted
as systemd would); what `up` heals by itself (a gateway node, a supervisor, a CVM) is left to it.

    faults = Faults(cluster, hosts, rng, down_s=(2, 6))
    record = await faults.inject("stream_leader")     # kill, wait down_s, restart; a dict
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

from bench._chaos_procs import HostProc, kill9
from pydstack.adapters.nats import NatsCluster

KINDS = ("nats_node", "stream_leader", "kms_replica", "gateway_node", "vmm", "supervisor", "cvm")


@dataclass
class Faults:
    cluster: NatsCluster
    hosts: dict[str, HostProc]  # "ha", "hk", "hb"
    rng: random.Random
    down_s: tuple[float, float]
    t0: float  # monotonic start of the soak

    async def inject(self, kind: str) -> dict[str, Any]:
        """Inject one fault of `kind`; its record: when (s since the soak's start), what,
        and when whatever needed restarting from outside was restarted."""
        rec: dict[str, Any] = {"t_s": round(time.monotonic() - self.t0, 1), "kind": kind,
                               "utc": time.strftime("%H:%M:%S", time.gmtime())}  # fmt: skip
        try:
            rec.update(await getattr(self, f"_{kind}")())
        except Exception as exc:  # a fault that could not be injected is reported, not raised
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rec["healed_t_s"] = round(time.monotonic() - self.t0, 1)
        return rec

    async def _down(self) -> float:
        d = self.rng.uniform(*self.down_s)
        await asyncio.sleep(d)
        return round(d, 1)

    def _leader(self) -> int | None:
        for i in range(len(self.cluster.nodes)):
            st = self.cluster.stream_state(i, "DSTACK")
            if st is not None and st.leader:
                return self.cluster.index_of(st.leader)
        return None

    async def _kill_node(self, i: int) -> dict[str, Any]:
        self.cluster.kill(i)
        down = await self._down()
        await self.cluster.restart(i)
        return {"target": self.cluster.configs[i].server_name, "down_s": down}

    async def _nats_node(self) -> dict[str, Any]:
        leader = await asyncio.to_thread(self._leader)
        others = [i for i in range(len(self.cluster.nodes)) if i != leader]
        return await self._kill_node(self.rng.choice(others))

    async def _stream_leader(self) -> dict[str, Any]:
        leader = await asyncio.to_thread(self._leader)
        if leader is None:
            raise RuntimeError("the stream has no leader to kill")
        return await self._kill_node(leader)

    async def _restart_up(self, host: HostProc) -> dict[str, Any]:
        """kill -9 of a host's up (what runs inside it with it), restarted on its data dir
        after the down time, as systemd's Restart=on-failure would."""
        host.kill9()
        down = await self._down()
        host.start()
        t = time.monotonic()
        await asyncio.to_thread(host.wait_ready)
        return {"target": f"{host.name}'s up", "down_s": down,
                "ready_after_restart_s": round(time.monotonic() - t, 1)}  # fmt: skip

    async def _kms_replica(self) -> dict[str, Any]:
        return await self._restart_up(self.hosts["hk"])

    async def _vmm(self) -> dict[str, Any]:
        # the VMM runs inside up (with the host's gateway node and, on A, its KMS)
        return await self._restart_up(self.hosts[self.rng.choice(["ha", "hb"])])

    async def _gateway_node(self) -> dict[str, Any]:
        host = self.hosts[self.rng.choice(["ha", "hb"])]
        pids = host.carriers()
        if not pids:
            raise RuntimeError(f"{host.name} runs no wireguard-go")
        for pid in pids:
            kill9(pid)
        back = await _until(lambda: bool(set(host.carriers()) - set(pids)), 30)
        return {"target": f"{host.name}'s gateway node (wireguard-go {pids})",
                "carrier_back_s": back}  # fmt: skip

    async def _supervisor(self) -> dict[str, Any]:
        host = self.hosts[self.rng.choice(["ha", "hb"])]
        pids = host.supervisors()
        if not pids:
            raise RuntimeError(f"{host.name} runs no supervisor")
        for pid in pids:
            kill9(pid)
        back = await _until(lambda: bool(set(host.supervisors()) - set(pids)), 30)
        return {"target": f"{host.name}'s supervisor {pids}", "supervisor_back_s": back}

    async def _cvm(self) -> dict[str, Any]:
        running = [(h, vm, pid) for h in ("ha", "hb") for vm, pid in self.hosts[h].cvms().items()]
        if not running:
            raise RuntimeError("no CVM runs")
        h, vm, pid = self.rng.choice(running)
        kill9(pid)
        work = self.hosts[h].home / "vmm" / "vms" / vm
        back = await _until(
            lambda: self.hosts[h].cvms().get(vm) not in (None, pid) or not work.exists(), 60
        )
        rec: dict[str, Any] = {"target": f"CVM {vm} on {h} (pid {pid})", "cvm_back_s": back}
        if not work.exists():  # the workload removed it meanwhile: nothing to come back
            rec.update(cvm_back_s=None, note="removed by the workload meanwhile")
        return rec


async def _until(check: Any, timeout: float) -> float | None:
    """Seconds until check() holds (polled every 0.2 s), None if not within timeout."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if await asyncio.to_thread(check):
            return round(time.monotonic() - t, 1)
        await asyncio.sleep(0.2)
    return None
