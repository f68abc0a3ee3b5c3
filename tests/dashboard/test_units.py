"""The dashboard's pure parts: app-compose, command decisions, filters, the live fold, the hub."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass

import pytest

from pydstack.actors.dashboard import (
    BadInput,
    CommandRefused,
    ComposeRequest,
    DeployRequest,
    Hub,
    LiveState,
    Update,
    build_app_compose,
    compose_ids,
    decide_vm_command,
    plan_deploy,
)
from pydstack.actors.dashboard._views import EventFilter, subject_matches
from pydstack.core.events import (
    CvmLiveness,
    CvmRegistered,
    Event,
    GatewayNodeJoined,
    KeyDenied,
    KeyIssued,
    KeyRequested,
    Signer,
    TunnelIpAllocated,
    VmRemoveRequested,
    VmRequested,
    VmResources,
    VmStartRequested,
    VmStopRequested,
    seal,
)
from pydstack.core.projections import Vm

from .support import APP_ID, INSTANCE, boot

SIGNER = Signer.from_private_bytes("t", os.urandom(32))


@dataclass(frozen=True)
class Rec:
    seq: int
    subject: str
    data: bytes
    time_ns: int = 0


def rec(seq: int, subj: str, event: Event) -> Rec:
    return Rec(seq, subj, seal(SIGNER, event, subject=subj, event_id=f"e{seq}", time_ns=seq,
                               correlation="c"))  # fmt: skip


def test_app_compose_has_dstack_vmm_cli_layout() -> None:
    """Fields and order of dstack's `vmm-cli.py compose --kms --gateway --public-logs
    --public-sysinfo`, json.dumps(indent=4, ensure_ascii=False), allowed_envs from the env names
    (deduplicated, in order); byte-exact vectors: tests/deploy/test_dstack_compose.py."""
    text = build_app_compose(ComposeRequest(name=" web ", compose="services: {}\n",
                                            env_names=("B", "A", "B")))  # fmt: skip
    assert text == json.dumps({
        "manifest_version": 2, "name": "web", "runner": "docker-compose",
        "docker_compose_file": "services: {}\n", "kms_enabled": True, "gateway_enabled": True,
        "local_key_provider_enabled": False, "key_provider_id": "", "public_logs": True,
        "public_sysinfo": True, "allowed_envs": ["B", "A"], "no_instance_id": False,
        "secure_time": False,
    }, indent=4)  # fmt: skip


def test_an_app_compose_is_used_byte_for_byte_and_may_name_its_app_id() -> None:
    raw = '{"manifest_version":2,"name":"n","app_id":"0xABCDEF0123456789ABCDEF0123456789ABCDEF01"}'
    assert build_app_compose(ComposeRequest(name="ignored", compose=raw)) == raw
    app_id, compose_hash, _ = compose_ids(raw)
    assert app_id == "abcdef0123456789abcdef0123456789abcdef01" and app_id != compose_hash[:40]


def test_deploy_plan_carries_the_sealed_env_and_the_compose_hash() -> None:
    text = build_app_compose(ComposeRequest(name="w", compose="x", env_names=("K",)))
    plan = plan_deploy(DeployRequest(app_compose=text, encrypted_env="ab" * 70,
                                     env_names=("K",), ports=("udp:0.0.0.0:9000:53",)),
                       vm_id="v")  # fmt: skip
    vm = plan.request
    assert (vm.vm_id, vm.app_id, vm.compose_hash) == ("v", plan.app_id, plan.compose_hash)
    assert vm.encrypted_env == bytes.fromhex("ab" * 70)
    assert (vm.ports[0].protocol, vm.ports[0].host_address, vm.ports[0].host_port) == (
        "udp", "0.0.0.0", 9000)  # fmt: skip
    with pytest.raises(BadInput, match=r"^ports: a host port is mapped twice"):
        plan_deploy(DeployRequest(app_compose=text, ports=("1:2", "1:3")), vm_id="v")


def _vm(state: str, desired: str) -> Vm:
    return Vm(vm_id="v", app_id="a", name="v", resources=VmResources(vcpu=1, memory_mb=1),
              state=state, desired=desired)  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.parametrize(
    ("state", "desired", "action", "outcome"),
    [
        ("scheduled", "running", "start", None),
        ("exited", "running", "start", VmStartRequested),
        ("stopped", "stopped", "start", VmStartRequested),
        ("running", "running", "stop", VmStopRequested),
        ("running", "stopped", "stop", None),
        ("running", "running", "remove", VmRemoveRequested),
        ("running", "removed", "remove", None),
        ("removed", "removed", "start", None),
    ],
)
def test_vm_command_decisions(state: str, desired: str, action: str, outcome: type | None) -> None:
    """A button appends its command unless the VM already wants that (or is removed): 409."""
    if outcome is None:
        with pytest.raises(CommandRefused) as refused:
            decide_vm_command(_vm(state, desired), "v", action)
        assert refused.value.status == 409
    else:
        assert type(decide_vm_command(_vm(state, desired), "v", action)) is outcome


def test_force_stop_is_allowed_again() -> None:
    assert decide_vm_command(_vm("running", "stopped"), "v", "stop", force=True).force is True


@pytest.mark.parametrize(
    ("pattern", "subj", "hit"),
    [
        ("dstack.vm.*", "dstack.vm.a", True),
        ("dstack.vm.*", "dstack.vmx.a", False),
        ("dstack.>", "dstack.kms.main", True),
        ("dstack.*.a", "dstack.vm.a", True),
        ("dstack.vm", "dstack.vm.a", True),
        ("dstack.vm.a", "dstack.vm.ab", True),
        ("dstack.*", "dstack.vm.a", False),
        ("dstack.vm.b", "dstack.vm.a", False),
    ],
)
def test_subject_filter(pattern: str, subj: str, hit: bool) -> None:
    """NATS wildcards, else a prefix (the page's JS filter does the same)."""
    assert subject_matches(pattern, subj) is hit


def test_type_filter_takes_any_of_several() -> None:
    state = LiveState()
    state.apply([rec(1, "dstack.kms.main", KeyRequested(request_id="r", app_id=APP_ID))])
    [row] = state.events
    assert EventFilter(types=("VmRequested", "KeyRequested")).matches(row)
    assert not EventFilter(types=("VmRequested",)).matches(row)


def test_live_fold_pairs_kms_decisions_and_counts_bad_messages() -> None:
    """Requests and outcomes join on request_id with their BootInfo; a redelivered seq changes
    nothing; a forged message is an event row with its error, not a fold input."""
    state = LiveState()
    k = "dstack.kms.main"
    rows, views = state.apply([
        rec(1, k, KeyRequested(request_id="a", app_id=APP_ID, method="GetAppKey")),
        rec(2, k, KeyIssued(request_id="a", boot_info=boot(), quote_hash="q", backend="dev")),
        rec(3, k, KeyDenied(request_id="b", reason="no", boot_info=None)),
        Rec(4, "dstack.vm.x", b"\x00" * 80),
    ])  # fmt: skip
    assert views == {"keys", "events"} and len(rows) == 4
    a, b = state.decisions["a"], state.decisions["b"]
    assert (a.outcome, a.method, a.backend, a.boot_info) == ("issued", "GetAppKey", "dev", boot())
    assert (b.outcome, b.reason, b.boot_info) == ("denied", "no", None)
    assert state.malformed == 1 and rows[-1].error.startswith("not_msgpack")
    assert state.apply([rec(2, k, KeyDenied(request_id="a", reason="late"))]) == ([], set())
    assert state.decisions["a"].outcome == "issued"


def test_liveness_without_a_cluster_reaches_every_cluster() -> None:
    """CvmLiveness names no cluster; the fold of the cluster that routes the instance takes it."""
    state = LiveState()
    key = "Zm9v" + "A" * 39 + "="
    state.apply([
        rec(1, "dstack.gateway.default", GatewayNodeJoined(
            node_id="g", wg_public_key="R" * 43 + "=", tunnel_ip="10.0.0.1", endpoint="e",
            base_domain="d")),
        rec(2, "dstack.gateway.default", TunnelIpAllocated(
            cluster="default", instance_id=INSTANCE, app_id=APP_ID, wg_public_key=key,
            tunnel_ip="10.0.0.2")),
        rec(3, f"dstack.cvm.{INSTANCE}", CvmRegistered(
            app_id=APP_ID, instance_id=INSTANCE, compose_hash="c", wg_public_key=key,
            tunnel_ip="10.0.0.2")),
    ])  # fmt: skip
    state.apply(
        [
            rec(
                4,
                f"dstack.cvm.{INSTANCE}",
                CvmLiveness(instance_id=INSTANCE, node_id="g", last_handshake=1234),
            )
        ]
    )
    assert state.clusters["default"].instances[INSTANCE].handshakes == {"g": 1234}


async def test_hub_closes_only_a_subscriber_that_falls_behind() -> None:
    hub = Hub()
    slow, fast = hub.subscribe(), hub.subscribe()
    for i in range(1000):
        hub.publish(Update(i, [], frozenset()))
        await fast.get()
    hub.publish(Update(1000, [], frozenset()))  # slow's queue (1000) is full: it is dropped
    assert len(hub) == 1 and slow.closed
    items = [slow.queue.get_nowait() for _ in range(slow.queue.qsize())]
    assert items[-1] is None
    assert (await asyncio.wait_for(fast.get(), 1)) == Update(1000, [], frozenset())


def test_requested_vm_shows_in_the_vm_fold() -> None:
    state = LiveState()
    _, views = state.apply([rec(1, "dstack.vm.v", VmRequested(
        vm_id="v", app_id="a", name="v", resources=VmResources(vcpu=1, memory_mb=1)))])  # fmt: skip
    assert views == {"vms", "hosts", "events"} and state.proj.vms["v"].state == "requested"


def test_gateway_view_has_the_nodes_table_with_added_domains() -> None:
    """The dashboard's gateway table is the one every node folds: a domain added with
    add-domain is one of its base domains, and the digest matches the nodes' (ClusterView)."""
    from pydstack.actors.dashboard._views import gateways
    from pydstack.core.events import GatewayDomainAdded
    from pydstack.core.gateway.certs import domain_subject
    from pydstack.core.gateway.table import routing_table

    state = LiveState()
    state.apply([
        rec(1, "dstack.gateway.default", GatewayNodeJoined(
            node_id="g", wg_public_key="R" * 43 + "=", tunnel_ip="10.0.0.1", endpoint="e",
            base_domain="d.example")),
        rec(2, domain_subject("default", "apps.example.org"), GatewayDomainAdded(
            cluster="default", domain="apps.example.org", acme_directory="https://ca/dir")),
    ])  # fmt: skip
    [view] = gateways(state)
    assert set(view["base_domains"]) == {"d.example", "apps.example.org"}
    nodes = routing_table(state.clusters["default"], ["apps.example.org"])
    assert view["digest"] == nodes.digest()
    assert "default:domain:apps_example_org" not in state.clusters  # no bogus cluster
