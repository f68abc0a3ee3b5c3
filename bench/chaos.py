"""Chaos soak: two hosts on a 3-node NATS cluster under continuous deploy / upgrade / remove
and HTTPS probes, while one component at a time is killed at random.

    python -m bench.chaos [--quick] [--minutes N]   # needs root, dockerd and wireguard-go

Machines are network namespaces on a private bridge (tests/gateway_nodes/lan.py), the NATS
nodes listen on the host's address on that bridge; nothing listens or sends elsewhere:

    ns ha: up (VMM, KMS, gateway gwa)   ns hk: up --no-host (KMS replica of A)   ns hb: up
      (VMM, gateway gwb; its CVMs ask K's KMS, then A's)        ns client: the probes

A stable app runs one CVM on each host; the probes GET it (``<app_id>-8080.<domain>``) through
both gateways every 0.5 s. The workload deploys, upgrades (`app upgrade`) and removes
short-lived apps on random hosts, and a writer appends a probe event every 0.5 s on its own
connection. Every 20-60 s (--quick: 8-20 s) one fault, taking the kinds in shuffled rounds:
kill -9 of a NATS node, of the stream leader, of the KMS replica's `up`, of a gateway node's
wireguard-go, of a host's `up` (its VMM), of a host's CVM supervisor, of one CVM. NATS nodes
and killed `up`s are started again after 2-6 s (as an operator or systemd would); the rest
`up` must heal by itself. Then every component is brought back, and the run checks:

- ``availability``: share of probe rounds answered 200 through at least one gateway (goal
  >= 0.99); ``availability_gwa`` / ``_gwb`` per gateway, ``max_outage_s`` the longest gap.
- ``lost_acked``: writes acknowledged to a writer (the probe writer's appends, every deploy,
  upgrade and remove the CLI said were done) missing from the log afterwards (goal 0).
- ``duplicate_effects``: a VM started again while running, scheduled twice, an instance
  holding two tunnel IPs or an IP held by two instances (goal 0).
- ``leaked_processes``: processes, cgroups and namespaces of the run left after the cleanup
  (goal 0); ``nodes_agree``: the three NATS nodes hold the same log; ``audit``: `pydstack
  audit` passes; ``tracebacks``: none in any `up`'s output.
- ``unexplained_failures``: a CLI command or append that failed outside a fault's window
  (the fault until 20 s after it healed) or with a traceback (goal 0); ``append_gaps``: from
  each failed append to the next acknowledged one.
- ``faults``: each one's time, target, how long what was killed took to come back, and the
  probe rounds that failed until the next fault, per gateway.

Exits non-zero when a goal is missed. Ctrl-C (or SIGTERM) stops it; everything is cleaned up
on any exit. --quick runs 10 minutes of faults (the setup and checks add ~3), --minutes N
any length. Last line: JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._chaos_faults import KINDS, Faults
from bench._chaos_log import duplicate_effects, lost_acked, nodes_agree
from bench._chaos_procs import HostProc, cleanup, leftovers
from bench._chaos_work import Soak, workload, writer
from bench._common import emit
from pydstack.adapters.nats import NatsCluster
from pydstack.adapters.secretfile import write_secret
from tests.cli.harness import cli
from tests.gateway_nodes.lan import Lan, namespace_lan
from tests.multihost.test_two_hosts import fetch, node_logs

DOMAIN = "apps.chaos.test"
GRACE_S = 20.0  # a failure this long after a fault healed is still the fault's


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 minutes, a fault every 8-20 s")
    ap.add_argument("--minutes", type=float, help="minutes of faults [30; --quick: 10]")
    ap.add_argument("--seed", type=int, help="random seed (the faults' order and targets)")
    ap.add_argument("--logs", type=Path, help="copy every up's output and the log here")
    ap.add_argument("--faults", default=",".join(KINDS),
                    help=f"the kinds to inject, comma-separated [{','.join(KINDS)}]")  # fmt: skip
    return ap.parse_args()


async def _start_hosts(lan: Lan, cluster: NatsCluster, root: Path) -> dict[str, HostProc]:
    """A, then the KMS replica K (onboarded from A) and B with join bundles from A's admin."""
    homes = {n: root / n[1] for n in ("ha", "hk", "hb")}
    nats = cluster.url
    r = cli(homes["ha"], "--nats", nats, "init", "--replicas", "3")
    if r.code:
        raise SystemExit(f"init failed: {r.err}")
    ip = {n: await lan.add(n) for n in ("ha", "hk", "hb")}
    await lan.add("client")
    sandbox = ["--vmm", "sandbox", "--gateway", "--gateway-domain", DOMAIN]
    hosts = {"ha": HostProc("ha", lan.ns("ha"), homes["ha"], [
        "--join", nats, "--listen", ip["ha"], "--host-id", "ha", "--gateway-node-id", "gwa",
        "--kms", "--allow-simulated", *sandbox])}  # fmt: skip
    hosts["ha"].start()
    state_a = await asyncio.to_thread(hosts["ha"].wait_ready)
    bundles = {}
    for name, role in (("hk", "--kms"), ("hb", "--gateway")):
        bundles[name] = root / f"{name}.bundle"
        r = cli(homes["ha"], "--nats", nats, "host", "add", name, "--out", str(bundles[name]),
                role)  # fmt: skip
        if r.code:
            raise SystemExit(f"host add {name} failed: {r.err}")
        shutil.copytree(homes["ha"] / "dev-pki", homes[name] / "dev-pki")
    # what an operator does: copy A's onboarding token (0600) to the replica's machine
    source = Path(state_a["kms_onboard_token_file"])
    token = write_secret(root / "hk-onboard-token", await asyncio.to_thread(source.read_bytes))
    hosts["hk"] = HostProc("hk", lan.ns("hk"), homes["hk"], [
        "--join", str(bundles["hk"]), "--listen", ip["hk"], "--no-host", "--no-gateway",
        "--allow-simulated", "--kms", "--kms-onboard", state_a["kms_url"],
        "--kms-onboard-token-file", str(token)])  # fmt: skip
    hosts["hk"].start()
    state_k = await asyncio.to_thread(hosts["hk"].wait_ready)
    hosts["hb"] = HostProc("hb", lan.ns("hb"), homes["hb"], [
        "--join", str(bundles["hb"]), "--listen", ip["hb"], "--gateway-node-id", "gwb",
        "--no-kms", "--kms-url", state_k["kms_url"], "--kms-url", state_a["kms_url"],
        "--allow-simulated", *sandbox])  # fmt: skip
    hosts["hb"].start()
    await asyncio.to_thread(hosts["hb"].wait_ready)
    return hosts


async def _probe_once(soak: Soak, hosts: dict[str, HostProc], names: list[str]) -> None:
    async def one(h: str, name: str) -> bool:
        state = hosts[h].state()  # re-read: a restarted up may listen elsewhere
        if not state.get("gateway_proxy"):
            return False
        try:
            code, _ = await fetch(soak.client_ns, state["gateway_proxy"], name,
                                  state["gateway_ca"])  # fmt: skip
        except (OSError, ssl.SSLError, ValueError, IndexError, TimeoutError):
            return False
        return code == 200

    for name in names:
        a, b = await asyncio.gather(one("ha", name), one("hb", name))
        soak.probes.append((time.monotonic(), a, b))


async def _prober(soak: Soak, hosts: dict[str, HostProc], names: list[str]) -> None:
    while not soak.stopping:
        t = time.monotonic()
        await _probe_once(soak, hosts, names)
        await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - t)))


async def _chaos(
    soak: Soak, faults: Faults, kinds: list[str], interval: tuple[float, float], end: float
) -> None:
    order: list[str] = []
    while True:
        wait = faults.rng.uniform(*interval)
        if time.monotonic() + wait > end:
            return
        await asyncio.sleep(wait)
        if not order:
            order = list(kinds)
            faults.rng.shuffle(order)
        kind = order.pop()
        soak.injecting_since = start = time.monotonic()
        rec = await faults.inject(kind)
        soak.windows.append((start, time.monotonic() + GRACE_S))
        soak.injecting_since = None
        soak.faults.append(rec)
        print(f"fault {len(soak.faults)}: {json.dumps(rec)}", flush=True)


async def _wait_reachable(soak: Soak, hosts: dict[str, HostProc], names: list[str],
                          within: float) -> str:  # fmt: skip
    """Every name answers 200 through both gateways within `within` seconds: ""; else the
    gateways that did not answer the last time."""
    deadline = time.monotonic() + within
    failing = "not tried"
    while time.monotonic() < deadline:
        before = len(soak.probes)
        await _probe_once(soak, hosts, names)
        got = soak.probes[before:]
        del soak.probes[before:]  # not part of the soak's figures
        failing = ", ".join(f"{names[i]} through {gw}" for i, (_, a, b) in enumerate(got)
                            for gw, ok in (("gwa", a), ("gwb", b)) if not ok)  # fmt: skip
        if not failing:
            return ""
        await asyncio.sleep(1)
    return failing


async def _stable_app(soak: Soak, root: Path) -> str:
    """One app with a CVM on each host; its app id once both are ready."""
    app_ids = {await asyncio.to_thread(soak.deploy, root / "stable", f"stable-{h}", h)
               for h in ("ha", "hb")}  # fmt: skip
    if None in app_ids or len(app_ids) != 1:
        raise SystemExit(f"the stable app's deploys gave app ids {app_ids}")
    await asyncio.to_thread(soak.wait_ready, {"stable-ha", "stable-hb"}, 240)
    return str(app_ids.pop())


async def _heal_all(cluster: NatsCluster, hosts: dict[str, HostProc]) -> None:
    for i, node in enumerate(cluster.nodes):
        if node.proc is None or node.proc.poll() is not None:
            await cluster.restart(i)
    for h in hosts.values():
        if not h.alive():
            h.start()
            await asyncio.to_thread(h.wait_ready)


def _keep_logs(logs: Path, hosts: dict[str, HostProc]) -> None:
    for h in hosts.values():
        for log in h.logs:
            shutil.copy(log, logs / log.name)
        for f in (h.home / "vmm" / "vms").glob("*/*.log"):
            shutil.copy(f, logs / f"{h.name}-{f.parent.name}-{f.name}")


async def run(
    minutes: float, quick: bool, seed: int, root: Path, logs: Path | None, kinds: list[str]
) -> dict[str, Any]:
    rng = random.Random(seed)
    hosts: dict[str, HostProc] = {}
    result: dict[str, Any] = {"seed": seed, "minutes": minutes}
    async with namespace_lan() as lan, NatsCluster.create(root / "nats", size=3,
                                                          host=lan.host_ip) as cluster:  # fmt: skip
        try:
            t = time.monotonic()
            hosts.update(await _start_hosts(lan, cluster, root))
            soak = Soak(root, hosts, cluster.url, lan.ns("client"), rng)
            app_id = await _stable_app(soak, root)
            names = [f"{app_id}-8080.{DOMAIN}"]
            if failing := await _wait_reachable(soak, hosts, names, 120):
                raise SystemExit(f"the stable app never answered: {failing}")
            print(f"setup: 3 ups, the stable app on both hosts, reachable after "
                  f"{time.monotonic() - t:.0f} s", flush=True)  # fmt: skip
            soak.t0 = time.monotonic()
            end = soak.t0 + minutes * 60
            faults = Faults(cluster, hosts, rng, (2.0, 6.0), soak.t0)
            interval = (8.0, 20.0) if quick else (20.0, 60.0)
            tasks = [asyncio.create_task(c) for c in (
                _prober(soak, hosts, names), workload(soak, end), writer(soak, end))]  # fmt: skip
            try:
                await _chaos(soak, faults, kinds, interval, end)
                await asyncio.sleep(max(0.0, end - time.monotonic()))
            finally:
                soak.stopping = True
                await asyncio.gather(*tasks, return_exceptions=True)
            await _heal_all(cluster, hosts)
            failing = await _wait_reachable(soak, hosts, names, 90)
            result["final_reachable"], result["final_failing"] = not failing, failing
            result.update(await _check(soak, cluster, logs))
        finally:
            await _teardown(hosts, cluster.url)
            if logs:
                await asyncio.to_thread(_keep_logs, logs, hosts)
    left = await asyncio.to_thread(leftovers, root, list(hosts.values()))
    result["leaked_processes"] = len(left)
    result["leaked"] = left[:10]
    result["tracebacks"] = sum("Traceback" in log.read_text(errors="replace")
                               for h in hosts.values() for log in h.logs)  # fmt: skip
    return result


async def _check(soak: Soak, cluster: NatsCluster, keep: Path | None) -> dict[str, Any]:
    home = soak.hosts["ha"].home
    await cluster.wait_converged("DSTACK", timeout=90)
    logs = await node_logs(cluster)
    r = await asyncio.to_thread(cli, home, "--nats", soak.nats, "events", "--json", timeout=300)
    events = r.lines()
    if keep:
        await asyncio.to_thread((keep / "events.jsonl").write_text, r.out)
    lost = lost_acked(soak.acked, events)
    dups = duplicate_effects(events)
    audit = await asyncio.to_thread(cli, home, "--nats", soak.nats, "audit", timeout=300)
    n = len(soak.probes)
    ok_any = sum(a or b for _, a, b in soak.probes)
    ready = soak.booted(events)
    _blame(soak)
    for line in lost[:10] + dups[:10]:
        print(line, flush=True)
    return {
        "availability": ok_any / n if n else 0.0,
        "availability_gwa": sum(a for _, a, _ in soak.probes) / n if n else 0.0,
        "availability_gwb": sum(b for _, _, b in soak.probes) / n if n else 0.0,
        "probes": n, "max_outage_s": soak.max_outage(),
        "outages_gwa": soak.outages(0)[:10], "outages_gwb": soak.outages(1)[:10],
        "lost_acked": len(lost), "acked": len(soak.acked),
        "duplicate_effects": len(dups), "duplicates": dups[:5],
        "deploys": len(soak.deployed), "deploys_ready": len(ready & soak.deployed),
        "upgrades": soak.upgrades, "removes": soak.removes,
        "appends": soak.appends, "appends_failed": soak.appends_failed,
        "append_gaps": soak.append_gaps()[:10],
        "cli_failures": len(soak.failures), "unexplained_failures": soak.unexplained(),
        "unexplained": [f for f in soak.failures if not f["explained"]][:5],
        "faults": soak.faults, "log_messages": len(logs[0]),
        "nodes_agree": not nodes_agree(logs), "audit": audit.code == 0,
        "audit_tail": (audit.out + audit.err).strip().splitlines()[-1:],
    }  # fmt: skip


def _blame(soak: Soak) -> None:
    """Each fault's record gets the probe rounds that failed from it until the next fault,
    through each gateway and through both."""
    starts = [f["t_s"] for f in soak.faults] + [float("inf")]
    for f, until in zip(soak.faults, starts[1:], strict=False):
        rounds = [(a, b) for t, a, b in soak.probes if f["t_s"] <= t - soak.t0 < until]
        f["failed_rounds"] = {"gwa": sum(not a for a, _ in rounds),
                              "gwb": sum(not b for _, b in rounds),
                              "both": sum(not (a or b) for a, b in rounds),
                              "of": len(rounds)}  # fmt: skip


async def _teardown(hosts: dict[str, HostProc], nats: str) -> None:
    """Remove the VMs while the VMMs can (60 s at most), stop every up, then clean what is
    left (supervisors and CVMs outlive up by design)."""
    live = [h for k, h in hosts.items() if k != "hk" and h.alive()]
    with contextlib.suppress(Exception):
        for h in live:
            for vm in h.cvms():
                await asyncio.to_thread(cli, h.home, "--nats", nats, "vm", "rm", vm, timeout=30)
        await asyncio.to_thread(_wait_gone, live, 60)
    for h in hosts.values():
        await asyncio.to_thread(h.stop)
    if hosts:
        root = next(iter(hosts.values())).home.parent
        await asyncio.to_thread(cleanup, root, list(hosts.values()),
                                [h.netns for h in hosts.values()])  # fmt: skip


def _wait_gone(hosts: list[HostProc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(h.cvms() for h in hosts) and time.monotonic() < deadline:
        time.sleep(1)


def _goals(r: dict[str, Any]) -> list[str]:
    missed = [f"{k} {r.get(k)}" for k, ok in (
        ("availability", r.get("availability", 0) >= 0.99),
        ("lost_acked", r.get("lost_acked") == 0),
        ("duplicate_effects", r.get("duplicate_effects") == 0),
        ("leaked_processes", r.get("leaked_processes") == 0),
        ("unexplained_failures", r.get("unexplained_failures") == 0),
        ("audit", r.get("audit") is True), ("nodes_agree", r.get("nodes_agree") is True),
        ("final_reachable", r.get("final_reachable") is True),
        ("tracebacks", r.get("tracebacks") == 0)) if not ok]  # fmt: skip
    missed += [f"fault {f['kind']} at {f['t_s']} s not injected: {f['error']}"
               for f in r.get("faults", []) if f.get("error")]  # fmt: skip
    return missed


def main() -> None:
    args = _args()
    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("wireguard-go"):
        raise SystemExit("bench.chaos needs root, dockerd (docker.io) and wireguard-go")
    minutes = args.minutes if args.minutes is not None else (10.0 if args.quick else 30.0)
    kinds = [k for k in args.faults.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        raise SystemExit(f"--faults: unknown kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleaned up like Ctrl-C
    root = Path(tempfile.mkdtemp(prefix="pdc-", dir="/tmp"))  # short: UAPI socket paths
    print(f"chaos soak: {minutes:g} min of faults, seed {seed}, in {root}", flush=True)
    try:
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(run(minutes, args.quick, seed, root, args.logs, kinds))
    except KeyboardInterrupt:
        print("interrupted: every process, namespace and file of the run is cleaned up")
        raise SystemExit(130) from None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    missed = _goals(result)
    print(f"availability {result.get('availability', 0):.4f} over {result.get('probes')} probe "
          f"rounds (longest outage {result.get('max_outage_s')} s), lost acked "
          f"{result.get('lost_acked')} of {result.get('acked')}, duplicate effects "
          f"{result.get('duplicate_effects')}, leaked {result.get('leaked_processes')}, "
          f"{len(result.get('faults', []))} faults; audit "
          f"{'passed' if result.get('audit') else 'FAILED'}", flush=True)  # fmt: skip
    result["goals_missed"] = missed
    emit(result)
    if missed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
