"""Two hosts on one replicated log: 3 `pydstack up` processes, each in its own network namespace
with its own data dir, on a 3-node NATS cluster: host A (VMM with sandbox CVMs, KMS, gateway
node gwa), the KMS replica K alone (onboarded from A), and host B (VMM, gateway node gwb, no
KMS of its own: its CVMs ask K, then A, with `--kms-url`). Apps deployed on both hosts answer
through both gateways; then, in turn, the NATS stream leader, the KMS replica K and gateway B
(host B's up) are killed with SIGKILL: every app stays reachable through the surviving
gateway, a CVM booting on B while K is down gets its keys from A, and the replicated log holds
every event the clients got acknowledged, identically on every NATS node.

    ns ha: up (VMM ha, KMS ha, gwa)   ns hk: up --no-host (KMS hk)   ns hb: up (VMM hb, gwb)
      CVMs: kms_urls [A]              onboarded from A               CVMs: kms_urls [K, A]
               \\______________________ bridge 10.A.0.0/24 ______________________/
                                  nats n0 n1 n2 on the host's address
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pydstack.adapters.nats import NatsCluster, read_node
from pydstack.adapters.sandbox import _netns
from pydstack.adapters.secretfile import write_secret
from pydstack.adapters.wireguard import netns as ns
from pydstack.core.events import verify
from tests.cli.harness import PYDSTACK, cli, wait_for
from tests.gateway_nodes.lan import Lan, namespace_lan

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello" / "docker-compose.yaml"
DOMAIN = "apps.multi.test"
APPS_PER_HOST = 5
pytestmark = pytest.mark.timeout(900)


class HostUp:
    """`pydstack up` inside a network namespace of the LAN (one "machine")."""

    def __init__(self, name: str, netns: str, home: Path, args: list[str]) -> None:
        self.name, self.netns, self.home = name, netns, home
        self.log = home.parent / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYDSTACK_")}
        with self.log.open("wb") as f:
            self.proc = subprocess.Popen(
                # nsenter switches the network namespace only: `ip netns exec` would also
                # remount /sys (no cgroups for the CVMs' dockerd) in a private mount namespace
                # (the CVMs' namespaces it creates would not be visible outside).
                ["nsenter", f"--net=/var/run/netns/{netns}", PYDSTACK, "up",
                 "--data-dir", str(home), "--log-json", "--metrics-port", "-1",
                 "--dashboard-port", "-1", "--reconcile-interval", "1", *args],
                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip

    def ready(self) -> dict[str, Any] | None:
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                e = json.loads(line)
                if e.get("event") == "control plane ready":
                    return dict(e)
        return None

    def wait_ready(self) -> dict[str, Any]:
        wait_for(lambda: self.ready() or self.proc.poll() is not None, timeout=120,
                 what=f"{self.name}'s up to be ready")  # fmt: skip
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        state: dict[str, Any] = json.loads((self.home / "state.json").read_text())
        return state

    def kill9(self) -> None:
        """SIGKILL to up itself (with whatever runs inside it: VMM, KMS, gateway node); the
        CVMs' supervisor is its own process and keeps them running, as after a VMM crash."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)  # nsenter execs: this is up
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


async def fetch(client_ns: str, proxy: str, host: str, cafile: str) -> tuple[int, str]:
    """GET https://host/ at a gateway's proxy address, from the client's namespace."""
    ctx = ssl.create_default_context(cafile=cafile)
    addr, _, port = proxy.rpartition(":")
    sock = ns.socket_in_netns(client_ns)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        try:
            await loop.sock_connect(sock, (addr, int(port)))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=host)
        try:
            writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = await reader.read()
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def reachable(
    client_ns: str, gateways: list[dict[str, Any]], apps: dict[str, str], within: float
) -> dict[tuple[str, str], str]:
    """Every app through every gateway answers 200 with its own app id within `within`
    seconds; returns what is still failing (empty: all good)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    failing: dict[tuple[str, str], str] = {}
    while True:
        failing = {}
        for gw in gateways:
            for vm, app_id in apps.items():
                host = f"{app_id}-8080.{DOMAIN}"
                try:
                    code, body = await fetch(client_ns, gw["gateway_proxy"], host, gw["ca"])
                    if code != 200 or f"app {app_id}" not in body:
                        failing[(gw["node"], vm)] = f"HTTP {code}: {body[:80]!r}"
                except (OSError, ssl.SSLError, ValueError, IndexError) as exc:
                    failing[(gw["node"], vm)] = repr(exc)
        if not failing or loop.time() > deadline:
            return failing
        await asyncio.sleep(1)


def deploy(home: Path, nats: str, vm: str, host_id: str) -> str:
    r = cli(home, "--nats", nats, "deploy", str(EXAMPLE), "--name", vm, "--vm-id", vm,
            "--host", host_id, "--image", "sandbox-busybox", "--memory", "256M",
            "--disk", "1G", "--no-wait", timeout=120)  # fmt: skip
    assert r.code == 0, r.out + r.err
    found = re.search(r"^app id\s+(\S+)", r.out, re.M)
    assert found, r.out
    return found.group(1)


def deploy_retrying(home: Path, nats: str, vm: str, host_id: str) -> tuple[str, str]:
    """(vm id, app id) of a deploy right after a NATS node died: the CLI's one-line "did not
    answer in time" during the leader election is retried, as it says, under a new VM id
    (a request that did land under the old one is simply another VM)."""
    for attempt in range(6):
        name = vm if attempt == 0 else f"{vm}{attempt}"
        try:
            return name, deploy(home, nats, name, host_id)
        except AssertionError as exc:
            if "did not answer in time" not in str(exc) or attempt == 5:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def booted(home: Path, nats: str) -> tuple[set[str], dict[str, str]]:
    """VMs whose boot reached "ready", and boot errors by VM."""
    r = cli(home, "--nats", nats, "events", "--subject", "dstack.vm.*", "--json")
    assert r.code == 0, r.err
    ready, errors = set(), {}
    for e in r.lines():
        vm = e["subject"].rsplit(".", 1)[1]
        if e["type"] == "VmBootProgress" and e["body"]["stage"] == "ready":
            ready.add(vm)
        elif e["type"] == "VmBootError":
            errors[vm] = e["body"]["error"]
    return ready, errors


def all_ready(home: Path, nats: str, vms: set[str]) -> bool:
    ready, errors = booted(home, nats)
    if errors:
        raise AssertionError(f"boot errors: {errors}")
    return vms <= ready


def key_issuers(home: Path, nats: str) -> dict[str, set[str]]:
    """The KMS instances that issued keys, by app id (KeyIssued, through its KeyRequested)."""
    r = cli(home, "--nats", nats, "events", "--subject", "dstack.kms.*", "--json")
    assert r.code == 0, r.err
    taken_by: dict[str, str] = {}
    out: dict[str, set[str]] = {}
    for e in r.lines():
        body = e["body"]
        if e["type"] == "KeyRequested":
            taken_by[body["request_id"]] = body.get("kms_instance", "")
        elif e["type"] == "KeyIssued":
            app_id = body["boot_info"]["app_id"]
            out.setdefault(app_id, set()).add(taken_by.get(body["request_id"], "?"))
    return out


async def node_logs(cluster: NatsCluster) -> list[list[tuple[int, bytes]]]:
    out = []
    for url in cluster.urls:
        msgs = await read_node(url, "DSTACK")
        out.append([(int((m.headers or {})["Nats-Sequence"]), m.data) for m in msgs])
    return out


def diagnose(home: Path, nats: str, hosts: list[HostUp]) -> str:
    """What the VMs and hosts say: their boot stages and errors, the hosts' last log lines."""
    r = cli(home, "--nats", nats, "events", "--subject", "dstack.vm.*", "--json")
    last: dict[str, str] = {}  # each VM's last event, and its stage if a boot progress
    for e in r.lines():
        stage = e["body"].get("stage", "")
        last[e["subject"]] = f"{e['type']} {stage} {e['body'].get('detail', '')}"[:200]
    lines = [f"{subj}: {what}" for subj, what in sorted(last.items())]
    for h in hosts:
        for vm in _vm_ids(h.home)[:2]:
            lines.append(f"--- {h.name} {vm} guest stderr")
            with contextlib.suppress(OSError):
                err = h.home / "vmm" / "vms" / vm / "guest.stderr.log"
                lines += err.read_text(errors="replace").splitlines()[-12:]
        lines.append(f"--- {h.name} log tail")
        lines += h.log.read_text(errors="replace").splitlines()[-5:]
    return "\n".join(lines[-90:])


def _stream_leader(cluster: NatsCluster) -> int:
    for i in range(len(cluster.nodes)):
        st = cluster.stream_state(i, "DSTACK")
        if st is not None and st.leader:
            return cluster.index_of(st.leader)
    raise AssertionError("the stream has no leader")


async def _wait_new_leader(cluster: NatsCluster, dead: int, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    dead_name = cluster.configs[dead].server_name
    while loop.time() < deadline:
        for i in range(len(cluster.nodes)):
            st = None if i == dead else await asyncio.to_thread(cluster.stream_state, i, "DSTACK")
            if st is not None and st.leader and st.leader != dead_name:
                return
        await asyncio.sleep(0.2)
    raise AssertionError("no new stream leader after the node died")


def _vm_ids(home: Path) -> list[str]:
    return [d.name for d in (home / "vmm" / "vms").glob("*") if d.is_dir()]


def _sandboxes(home: Path) -> list[dict[str, str]]:
    out = []
    for f in (home / "vmm" / "vms").glob("*/sandbox.json"):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(f.read_text()))
    return out


def _cleanup(root: Path, homes: list[Path], host_netns: list[str]) -> None:
    """What the hosts leave once killed: CVM namespaces and what runs in them, supervisors,
    the gateways' wireguard-go, mounts the CVMs' docker engines made."""
    boxes = [sb for h in homes for sb in _sandboxes(h)]
    for name in [sb["netns"] for sb in boxes] + host_netns:
        _netns.kill_all(name)
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if str(root).encode() in (d / "cmdline").read_bytes():
                    os.kill(int(d.name), signal.SIGKILL)
    for sb in boxes:
        _netns.unmount_under(root, Path(sb["run_dir"]))
        _netns.delete(sb["netns"])
        shutil.rmtree(sb["run_dir"], ignore_errors=True)
    _netns.unmount_under(root)


async def test_two_hosts_survive_a_nats_node_a_kms_replica_and_a_gateway_going_down(
    short_tmp: Path,
) -> None:
    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("wireguard-go"):
        pytest.skip("hosts with sandbox CVMs and gateways need root, dockerd and wireguard-go")
    root = short_tmp
    homes = {name: root / name[1] for name in ("ha", "hk", "hb")}
    hosts: list[HostUp] = []
    async with namespace_lan() as lan:
        async with NatsCluster.create(root / "nats", size=3, host=lan.host_ip) as cluster:
            try:
                await _scenario(lan, cluster, homes, hosts)
            finally:
                for h in hosts:  # remove what still runs while a VMM can do it
                    if h.proc.poll() is None:
                        for vm in _vm_ids(h.home):
                            cli(h.home, "--nats", cluster.url, "vm", "rm", vm)
                for h in hosts:
                    h.stop()
                await asyncio.to_thread(
                    _cleanup, root, list(homes.values()), [lan.ns(n) for n in homes]
                )


def copy_token(source: str, home: Path) -> str:
    """What an operator does: copy the source KMS's onboarding token (0600) to the replica."""
    assert Path(source).stat().st_mode & 0o777 == 0o600
    return str(write_secret(home.parent / f"{home.name}-onboard-token", Path(source).read_bytes()))


async def _scenario(
    lan: Lan, cluster: NatsCluster, homes: dict[str, Path], hosts: list[HostUp]
) -> None:
    nats = cluster.url
    home_a, home_k, home_b = homes["ha"], homes["hk"], homes["hb"]
    r = cli(home_a, "--nats", nats, "init", "--replicas", "3")
    assert r.code == 0, r.out + r.err
    ip_a, ip_k, ip_b = await lan.add("ha"), await lan.add("hk"), await lan.add("hb")
    await lan.add("client")
    sandbox = ["--vmm", "sandbox", "--gateway", "--gateway-domain", DOMAIN]
    # every host listens on its LAN address without TDX: simulated beyond loopback, allowed
    host_a = HostUp("ha", lan.ns("ha"), home_a, [
        "--join", nats, "--listen", ip_a, "--host-id", "ha", "--gateway-node-id", "gwa",
        "--kms", "--allow-simulated", *sandbox])  # fmt: skip
    hosts.append(host_a)
    state_a = await asyncio.to_thread(host_a.wait_ready)
    # Further machines get keys of their own from A's admin (`host add`: a join bundle with
    # only their seeds and the cluster's public data); without TDX they also share A's dev
    # PKI, so the KMS replicas trust each other's and the CVMs' simulated quotes.
    bundles: dict[str, Path] = {}
    for name, home, role in (("hk", home_k, "--kms"), ("hb", home_b, "--gateway")):
        bundles[name] = home_a.parent / f"{name}.bundle"
        r = cli(home_a, "--nats", nats, "host", "add", name, "--out", str(bundles[name]), role)
        assert r.code == 0, r.out + r.err
        await asyncio.to_thread(shutil.copytree, home_a / "dev-pki", home / "dev-pki")
    seeds_a = [f.read_text().strip() for f in (home_a / "identities").glob("*.nk")]
    for bundle in bundles.values():
        text = bundle.read_text()
        assert not [seed for seed in seeds_a if seed in text]  # none of A's, admin's included
    # K: a KMS replica alone (no VMM, no gateway), onboarded from A's KMS; instance "hk". A's
    # dev backend authorizes no KMS: the operator copies A's onboarding token to K (0600).
    assert state_a["kms_onboard_token_file"] == str(home_a / "kms" / "onboard-token")
    token_k = await asyncio.to_thread(copy_token, state_a["kms_onboard_token_file"], home_k)
    kms_k = HostUp("hk", lan.ns("hk"), home_k, [
        "--join", str(bundles["hk"]), "--listen", ip_k, "--no-host", "--no-gateway",
        "--allow-simulated", "--kms", "--kms-onboard", state_a["kms_url"],
        "--kms-onboard-token-file", token_k])  # fmt: skip
    hosts.append(kms_k)
    state_k = await asyncio.to_thread(kms_k.wait_ready)
    assert state_k["kms_url"].startswith(f"https://{ip_k}:"), state_k
    assert state_k["vmm_url"] is None and "gateway_proxy" not in state_k, state_k
    # B: VMM and gateway node, no KMS: its CVMs ask K, then A.
    host_b = HostUp("hb", lan.ns("hb"), home_b, [
        "--join", str(bundles["hb"]), "--listen", ip_b, "--gateway-node-id", "gwb",
        "--no-kms", "--kms-url", state_k["kms_url"], "--kms-url", state_a["kms_url"],
        "--allow-simulated", *sandbox])  # fmt: skip
    hosts.append(host_b)
    state_b = await asyncio.to_thread(host_b.wait_ready)
    for home, keys in ((home_k, {"vmm-hk", "kms-hk"}), (home_b, {"vmm-hb", "gateway-hb"})):
        assert {p.stem for p in (home / "identities").glob("*.nk")} == keys  # no admin key
    assert state_b["kms_url"] is None and state_b["gateway_proxy"].startswith(f"{ip_b}:")

    apps: dict[str, str] = {}
    on_b: set[str] = set()
    for i in range(APPS_PER_HOST * 2):
        vm, host_id = f"app{i}", ("ha", "hb")[i % 2]
        apps[vm] = await asyncio.to_thread(deploy, home_a, nats, vm, host_id)
        if host_id == "hb":
            on_b.add(apps[vm])
    gateways = [
        {"node": "gwa", "gateway_proxy": state_a["gateway_proxy"], "ca": state_a["gateway_ca"]},
        {"node": "gwb", "gateway_proxy": state_b["gateway_proxy"], "ca": state_b["gateway_ca"]},
    ]
    await _wait_booted(home_a, nats, set(apps), hosts)
    failing = await reachable(lan.ns("client"), gateways, apps, within=90)
    assert not failing, f"not reachable through both gateways: {failing}"

    # Every app got its keys: host A's CVMs from A's KMS, host B's from the replica K (which
    # onboarded from A once, over mutual RA-TLS).
    kms = cli(home_a, "--nats", nats, "events", "--subject", "dstack.kms.*", "--json").lines()
    assert sum(e["type"] == "KmsReplicaOnboarded" for e in kms) == 1
    issuers = await asyncio.to_thread(key_issuers, home_a, nats)
    for app_id in apps.values():
        assert issuers.get(app_id) == ({"hk"} if app_id in on_b else {"ha"}), (app_id, issuers)
    for home, urls in ((home_a, [state_a["kms_url"]]),
                       (home_b, [state_k["kms_url"], state_a["kms_url"]])):  # fmt: skip
        vm = _vm_ids(home)[0]
        sysc = json.loads(
            await asyncio.to_thread(
                (home / "vmm" / "vms" / vm / "shared" / ".sys-config.json").read_text
            )
        )
        assert sysc["kms_urls"] == urls, (vm, sysc)

    # 1. A NATS node dies (the stream leader): after the election the log accepts appends
    #    again, and every app stays reachable meanwhile.
    victim = _stream_leader(cluster)  # the hard case: the stream's leader
    cluster.kill(victim)
    failing = await reachable(lan.ns("client"), gateways, apps, within=30)
    assert not failing, f"right after killing NATS node {victim}: {failing}"
    await _wait_new_leader(cluster, victim)  # JetStream elects one in a few seconds
    late, extra = await asyncio.to_thread(deploy_retrying, home_a, nats, "late", "ha")
    failing = await reachable(lan.ns("client"), gateways, {**apps, late: extra}, within=120)
    assert not failing, f"after killing NATS node {victim}: {failing}"
    apps[late] = extra

    # 2. The KMS replica K dies (kill -9 of its up): the running CVMs need it no more, and a
    #    CVM booting on host B now gets its keys from A, the next KMS in its list.
    await asyncio.to_thread(kms_k.kill9)
    failing = await reachable(lan.ns("client"), gateways, apps, within=30)
    assert not failing, f"after the KMS replica died: {failing}"
    fallback = await asyncio.to_thread(deploy, home_a, nats, "fallback", "hb")
    apps["fallback"] = fallback
    await _wait_booted(home_a, nats, set(apps), hosts)
    issuers = await asyncio.to_thread(key_issuers, home_a, nats)
    assert issuers.get(fallback) == {"ha"}, issuers.get(fallback)
    failing = await reachable(lan.ns("client"), gateways, apps, within=90)
    assert not failing, f"after a boot on host B with the KMS replica down: {failing}"

    # 3. Gateway B dies (kill -9 of host B's up, its VMM with it). Its CVMs keep running
    #    under their supervisor; gateway A still routes to all of them.
    await asyncio.to_thread(host_b.kill9)
    failing = await reachable(lan.ns("client"), gateways[:1], apps, within=60)
    assert not failing, f"through gateway A after gateway B died: {failing}"

    # 4. The log: the NATS node back, all three nodes converge on the same messages, every one
    #    signed and chained; nothing acknowledged is missing (each deploy's events are there).
    await cluster.restart(victim)
    await cluster.wait_converged("DSTACK", timeout=60)
    logs = await node_logs(cluster)
    assert logs[0] == logs[1] == logs[2]
    subjects = {verify(data).subject for _, data in logs[0]}
    for vm in apps:
        assert f"dstack.vm.{vm}" in subjects, f"VmRequested of {vm} missing"
    audit = cli(home_a, "--nats", nats, "audit")
    assert audit.code == 0, audit.out + audit.err


async def _wait_booted(home: Path, nats: str, vms: set[str], hosts: list[HostUp]) -> None:
    try:
        await asyncio.to_thread(
            wait_for, lambda: all_ready(home, nats, vms), timeout=180,
            what="every app's CVM to boot (keys, gateway, app)",
        )  # fmt: skip
    except AssertionError:
        raise AssertionError(diagnose(home, nats, hosts)) from None
