"""Attack: a port map's ``host_address`` carrying QEMU options. Written into ``-netdev user,
...,hostfwd=`` as it was, ``127.0.0.1:1-:1,guestfwd=tcp:10.0.2.100:4444-cmd:<cmd>,...`` made
QEMU run ``<cmd>`` on the host when the guest connected. It must be refused at every entry (VMM
API, CLI, dashboard's planner, the scheduler and the VMM's fold for events already on the log)
and again by the argv builder, with one line naming the field; nothing reaches QEMU's argv."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pydstack.adapters.nats import EventStore
from pydstack.adapters.qemu.argv import ArgvError, PortForward, QemuSpec, build_argv
from pydstack.core.apps import BadInput, DeployRequest, plan_deploy
from pydstack.core.events import PortMap, VmBootError, VmRequested, VmResources, VmScheduled
from pydstack.core.events import subject as subject_of
from pydstack.core.portmap import address_error, port_map_error
from tests.cli.harness import cli
from tests.vmm.conftest import VmmHost, compose, events_of, wait_until

PAYLOAD = "127.0.0.1:1-:1,guestfwd=tcp:10.0.2.100:4444-cmd:touch /tmp/pwned,hostfwd=tcp:127.0.0.1"
VARIANTS = [
    PAYLOAD,
    "127.0.0.1,,guestfwd=tcp:10.0.2.100:1-cmd:id",  # QEMU's own escape, doubled comma
    "localhost",  # a name: resolved by QEMU, i.e. whatever the host's resolver says
    "127.0.0.1\n",
    "::1%lo",  # zone id
    "127.000.000.001",  # not canonical
    "",
    "[::1]",
]


def _spec(address: str) -> QemuSpec:
    port = PortForward(host_address=address, host_port=20080, vm_port=80)
    return QemuSpec(vm_id="vm1", platform="tcg", vcpu=1, memory_mb=256, kernel="/k",
                    initrd="/i", ports=(port,))  # fmt: skip


@pytest.mark.parametrize("address", VARIANTS)
def test_argv_builder_refuses_anything_but_an_ip_literal(address: str) -> None:
    with pytest.raises(ArgvError, match=r"^ports: host address"):
        build_argv(_spec(address))


@given(st.text(max_size=80))
def test_any_string_is_an_ip_literal_or_refused(address: str) -> None:
    bad = address_error(address)
    if bad is None:
        assert str(ipaddress.ip_address(address)) == address
        assert not set(address) & set(",=-% \n\t[]")
        argv = build_argv(_spec(address))
        netdev = argv[argv.index("-netdev") + 1]
        assert netdev.count("hostfwd=") == 1 and "guestfwd" not in netdev
    else:
        assert "\n" not in bad and bad.startswith("host address")
        with pytest.raises(ArgvError):
            build_argv(_spec(address))


def test_a_public_address_needs_the_hosts_setting_never_the_requesters_word() -> None:
    wild = PortMap(host_address="0.0.0.0", host_port=20080, vm_port=80)
    assert "not loopback" in (port_map_error(wild, public_allowed=False) or "")
    assert port_map_error(wild, public_allowed=True) is None
    canonical = str(ipaddress.ip_address("::ffff:127.0.0.1"))  # its form varies by Python
    mapped = PortMap(host_address=canonical, host_port=20080, vm_port=80)
    assert port_map_error(mapped, public_allowed=False) is None  # still loopback


# In the "[PROTO:][ADDR:]HOST:VM" text form an empty ADDR means the default (loopback) and
# "[::1]" is how an IPv6 literal is written, so those two are not attacks there.
@pytest.mark.parametrize("address", VARIANTS[:-2])
def test_dashboard_and_deploy_planner_refuse_it(address: str) -> None:
    app = json.dumps({"manifest_version": 2, "name": "web", "runner": "docker-compose",
                      "docker_compose_file": "services: {}"}).encode()  # fmt: skip
    with pytest.raises(BadInput) as exc:
        plan_deploy(
            DeployRequest(app_compose=app.decode(), ports=(f"tcp:{address}:20080:80",)), vm_id="v"
        )
    assert exc.value.field == "ports" and "\n" not in str(exc.value)


def test_cli_refuses_it_with_one_line(tmp_path: Path) -> None:
    r = cli(tmp_path / "home", "vm", "request", "web", "--port", f"tcp:{PAYLOAD}:20080:80")
    assert r.code != 0
    err = [x for x in r.err.splitlines() if x.strip()]
    assert any("--port" in x and "expected" in x for x in err), r.err
    assert "Traceback" not in r.err


async def test_vmm_api_refuses_it_and_appends_nothing(vmm_host: VmmHost, store: EventStore) -> None:
    async with vmm_host.running() as (_, api):
        status, body = await api.call("CreateVm", {
            "id": "evil", "name": "evil", "image": "sandbox-busybox", "compose_file": compose(),
            "ports": [{"host_port": 20080, "vm_port": 80, "host_address": PAYLOAD}],
        })  # fmt: skip
        assert status == 400 and body["field"] == "ports", body
        assert "is not an IP address" in body["error"]
        assert await store.last_by_subject(subject_of("vm", "evil")) is None


async def test_vmm_api_refuses_a_public_address_unless_the_host_allows_it(
    vmm_host: VmmHost, store: EventStore
) -> None:
    async with vmm_host.running() as (_, api):
        status, body = await api.call("CreateVm", {
            "id": "pub", "name": "pub", "image": "sandbox-busybox", "compose_file": compose(),
            "ports": [{"host_port": 20080, "vm_port": 80, "host_address": "0.0.0.0"}],
        })  # fmt: skip
        assert status == 400 and "allow-public-ports" in body["error"], body


async def test_an_event_on_the_log_carrying_it_never_starts(
    vmm_host: VmmHost, store: EventStore
) -> None:
    """A writer that skips every API puts the port map straight on the log, already placed
    (so no scheduler judges it): the VMM's own check refuses before any backend call."""
    evil = PortMap(host_address=PAYLOAD, host_port=20080, vm_port=80)
    requested = VmRequested(
        vm_id="forged", app_id="a" * 40, name="forged", host="h1", compose=compose().encode(),
        resources=VmResources(vcpu=1, memory_mb=256), image="sandbox-busybox",
    )  # fmt: skip
    scheduled = VmScheduled(vm_id="forged", host="h1", cid=1000, ports=(evil,))
    async with vmm_host.running() as (vmm, _):
        await store.append(subject_of("vm", "forged"), [requested, scheduled], 0)

        async def refused() -> list[VmBootError]:
            return [e for e in await events_of(store, "forged") if isinstance(e, VmBootError)]

        [err] = (await wait_until(refused, 30, "the VMM's refusal"))[:1]
        assert "is not an IP address" in err.error
        with pytest.raises(Exception):  # noqa: B017  # any CvmNotFound-like error
            await vmm.backend.status("forged")
