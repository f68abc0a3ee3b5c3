"""App ids and instance ids at the gateway (issue 14).

The host writes instance-info, so a TD's attested instance id (and, until the KMS checks it,
its app id) is whatever the host chose. Before: an instance id equal to a victim's app id was
looked up first and shadowed the whole app (``<victim app id>.<domain>`` reached the
attacker), an app id equal to a victim's instance id was admitted, and a registration under
a victim's instance id from another key moved the victim's tunnel IP to the attacker's key.
Now one id is never both an app and an instance on a cluster's ledger, and a lease moves to
a new key only for the same attested instance (app id, compose hash, mr_system); each claim
on someone else's id is refused with 403 and one line, nothing appended."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pydstack.actors.gateway import Registrar, RegistrarConfig
from pydstack.actors.gateway.registration import RegistrationConfig, registration_app
from pydstack.adapters.nats import NEW, EventStore, Version
from pydstack.adapters.tdx.pki import DevPki
from pydstack.core.apps import ComposeRequest, build_app_compose
from pydstack.core.events import (
    AnyEvent,
    AppRegistered,
    AppUpgraded,
    GatewayNodeJoined,
    TunnelIpAllocated,
    message_hash,
    subject,
)
from pydstack.core.gateway.cluster import ClusterState, fold, on_its_subject
from pydstack.core.gateway.table import TableIndex, routing_table
from pydstack.core.projections import Applied
from pydstack_guest.boot import HostShared, plan_boot
from tests import vmmapi
from tests.boot.test_gateway_deploy import (
    EXAMPLE,
    _cleanup,
    _deploy_example,
    _events,
    _get,
    _line,
    _remove_vms,
    _sandbox,
    _up_with_gateway,
)
from tests.cli.harness import wait_for
from tests.gateway.given import key
from tests.gateway.simcvm import DevCa, SimCvm
from tests.gateway.test_registration import Gateway, _dev_verifier, _serve, gateway, pki

__all__ = ["gateway", "pki"]  # fixtures of the RegisterCvm suite (real mutual TLS, NATS)

VICTIM_APP = bytes([0x5A] * 20)
ATTACKER_APP = bytes([0xA7] * 20)


async def _routes(gw: Gateway) -> TableIndex:
    """The routing index every gateway node derives from the log as it stands."""
    events = [
        Applied(n, 0, e)
        for n, (subj, e) in enumerate(await gw.events(), 1)
        if on_its_subject("default", subj, e) and isinstance(e, AnyEvent)
    ]
    return TableIndex.of(routing_table(fold(events, ClusterState())))


async def _victim(gw: Gateway) -> SimCvm:
    victim = SimCvm(gw.pki, VICTIM_APP, bytes([0x11] * 20), b"victim compose")
    status, out = await gw.post(await victim.identity(gw.ca), {"client_public_key": key(1)})
    assert status == 200, out
    return victim


async def _refused(gw: Gateway, cvm: SimCvm, wg_key: str, code: str, reason: str) -> None:
    before = await gw.store.last_seq()
    status, out = await gw.post(await cvm.identity(gw.ca), {"client_public_key": wg_key})
    assert (status, out["code"]) == (403, code) and reason in out["error"], out
    assert "\n" not in out["error"]
    assert await gw.store.last_seq() == before  # nothing appended, not even a refusal


@pytest.mark.timeout(60)
async def test_an_app_id_as_instance_id_is_refused_and_does_not_shadow_the_app(
    gateway: Gateway,
) -> None:
    """A TD whose host wrote the victim's app id as its instance id gets 403; the victim's
    app URL still resolves to the victim's instance only."""
    victim = await _victim(gateway)
    shadow = SimCvm(gateway.pki, ATTACKER_APP, VICTIM_APP, b"attacker compose")
    await _refused(
        gateway, shadow, key(2), "id_in_use", f"instance id {VICTIM_APP.hex()} is an app id"
    )
    routes = (await _routes(gateway)).resolve(VICTIM_APP.hex())
    assert [r.instance_id for r in routes] == [victim.instance_id.hex()]


@pytest.mark.timeout(60)
async def test_an_instance_id_as_app_id_is_refused(gateway: Gateway) -> None:
    """An app id equal to a victim's instance id is refused (the reverse of the above)."""
    victim = await _victim(gateway)
    twin = SimCvm(gateway.pki, victim.instance_id, bytes([0x22] * 20), b"attacker compose")
    await _refused(
        gateway, twin, key(2), "id_in_use", f"app id {victim.instance_id.hex()} is an instance id"
    )
    routes = await _routes(gateway)
    assert routes.resolve(victim.instance_id.hex())[0].wg_public_key == key(1)


@pytest.mark.timeout(60)
async def test_a_victims_instance_id_from_another_td_keeps_its_address_and_key(
    gateway: Gateway,
) -> None:
    """A TD whose host wrote the victim's app id and instance id, with its own compose, asks
    for the victim's lease with its own WireGuard key: 403, the IP stays with the victim's
    key and the route with the victim's instance."""
    victim = await _victim(gateway)
    thief = SimCvm(gateway.pki, VICTIM_APP, victim.instance_id, b"attacker compose")
    await _refused(gateway, thief, key(2), "not_same_instance", "another attested identity")
    ledger = [e for _, e in await gateway.events() if isinstance(e, TunnelIpAllocated)]
    assert [(e.wg_public_key, e.tunnel_ip) for e in ledger] == [(key(1), "10.0.0.2")]
    (route,) = (await _routes(gateway)).resolve(VICTIM_APP.hex())
    assert (route.wg_public_key, route.tunnel_ip) == (key(1), "10.0.0.2")


@pytest.mark.timeout(60)
async def test_the_same_instance_rebooted_with_a_new_key_keeps_its_address(
    gateway: Gateway,
) -> None:
    """Control: the victim's own TD booting again (same app, compose, measurements) with a
    fresh WireGuard key keeps its address, now with the new key."""
    victim = await _victim(gateway)
    again = SimCvm(gateway.pki, VICTIM_APP, victim.instance_id, b"victim compose")
    status, out = await gateway.post(
        await again.identity(gateway.ca), {"client_public_key": key(3)}
    )
    assert status == 200 and out["wg"]["client_ip"] == "10.0.0.2", out
    (route,) = (await _routes(gateway)).resolve(VICTIM_APP.hex())
    assert route.wg_public_key == key(3)


@pytest.mark.timeout(60)
async def test_an_upgrade_its_app_allows_on_the_log_keeps_the_address(gateway: Gateway) -> None:
    """The victim's instance booting a compose its app's AppUpgraded names (same instance id,
    same OS) keeps its address with its new key; the thief's compose, on no app event, does
    not, even after that upgrade."""
    victim = await _victim(gateway)
    old, new = victim.compose_hash.hex(), hashlib.sha256(b"victim compose v2").hexdigest()
    app = subject("app", VICTIM_APP.hex())
    await gateway.store.append(app, [AppRegistered(app_id=VICTIM_APP.hex(), compose_hash=old)], NEW)
    last = await gateway.store.last_by_subject(app)
    assert last is not None
    upgrade = AppUpgraded(app_id=VICTIM_APP.hex(), compose_hash=new, previous_compose_hash=old)
    await gateway.store.append(app, [upgrade], Version(last.seq, message_hash(last.data)))
    thief = SimCvm(gateway.pki, VICTIM_APP, victim.instance_id, b"attacker compose")
    await _refused(gateway, thief, key(2), "not_same_instance", "do not name")
    v2 = SimCvm(gateway.pki, VICTIM_APP, victim.instance_id, b"victim compose v2")
    status, out = await gateway.post(await v2.identity(gateway.ca), {"client_public_key": key(3)})
    assert status == 200 and out["wg"]["client_ip"] == "10.0.0.2", out
    (route,) = (await _routes(gateway)).resolve(VICTIM_APP.hex())
    assert route.wg_public_key == key(3)


@pytest.mark.timeout(60)
async def test_with_the_log_backend_the_gateway_admits_only_composes_the_app_names(
    store: EventStore, pki: DevPki
) -> None:
    """A gateway of an up whose KMS uses the log backend (RegistrationConfig.log_auth): a TD
    of an unregistered app, or of a registered app with a compose its events do not name, is
    refused (403 unauthorized); the registered compose is admitted. (A TD that skips the
    KMS cannot reach the victim's URL with a compose of its own.)"""
    ca = DevCa.create()
    registrar = Registrar(store, RegistrarConfig(node_id="gw1"))
    node = GatewayNodeJoined(node_id="gw1", wg_public_key=key(501), tunnel_ip="10.0.0.129",
                             endpoint="192.0.2.1:51820", base_domain="gw.example.com")  # fmt: skip
    assert await registrar.join(node) == node
    cfg = RegistrationConfig(node_id="gw1", log_auth=True)
    runner, port = await _serve(registration_app(registrar, _dev_verifier(pki), cfg), pki, ca)
    gw = Gateway(f"https://127.0.0.1:{port}", store, ca, pki, _dev_verifier(pki), [])
    try:
        victim = SimCvm(pki, VICTIM_APP, bytes([0x11] * 20), b"victim compose")
        evil = SimCvm(pki, VICTIM_APP, bytes([0x12] * 20), b"attacker compose")
        status, out = await gw.post(await victim.identity(ca), {"client_public_key": key(1)})
        assert (status, out["code"]) == (403, "unauthorized"), out
        registered = AppRegistered(app_id=VICTIM_APP.hex(), compose_hash=victim.compose_hash.hex())
        await store.append(subject("app", VICTIM_APP.hex()), [registered], NEW)
        status, out = await gw.post(await evil.identity(ca), {"client_public_key": key(2)})
        assert (status, out["code"]) == (403, "unauthorized") and "not named" in out["error"]
        status, out = await gw.post(await victim.identity(ca), {"client_public_key": key(1)})
        assert status == 200, out
        assert [r.instance_id for r in (await _routes(gw)).resolve(VICTIM_APP.hex())] == [
            victim.instance_id.hex()
        ]
    finally:
        await runner.cleanup()
        await registrar.aclose()


def test_a_host_written_instance_id_is_not_measured() -> None:
    """The host writes a victim's instance id beside its own seed into instance-info: the
    guest measures sha256(seed || app_id)[:20] (dstack's derivation), never the written id,
    so the KMS and the gateway, which read the instance id from the replayed event log, see
    the attacker's own instance."""
    victim_instance, seed = bytes([0x11] * 20), bytes([0x77] * 20)
    info = {"app_id": VICTIM_APP.hex(), "instance_id": victim_instance.hex(),
            "instance_id_seed": seed.hex()}  # fmt: skip
    plan = plan_boot(HostShared(app_compose=b"{}", instance_info=json.dumps(info).encode()))
    assert plan.instance_id == hashlib.sha256(seed + VICTIM_APP).digest()[:20]
    assert plan.instance_id != victim_instance


@pytest.mark.timeout(500)
def test_a_second_vm_with_a_victims_app_id_and_its_own_compose_gets_no_keys_and_no_route(
    short_tmp: Path,
) -> None:
    """Default ``up`` (the log backend) with the example deployed; a second VM created through
    the VMM API under the victim's app id with a compose of its own: the KMS denies its keys
    (KeyDenied naming the compose), its boot stops at keys, it never registers at the gateway,
    and every request to the victim's URL is served by the victim. Before, the dev default
    gave it keys and the gateway balanced the victim's users onto it."""
    home, plane = _up_with_gateway(short_tmp)
    sandboxes: dict[str, dict[str, str]] = {}
    vms = ["victim", "evil"]
    try:
        state = msgspec.json.decode((home / "state.json").read_bytes())
        proxy, ca = state["gateway_proxy"], state["gateway_ca"]
        r = _deploy_example(home, short_tmp, "victim", "victim", sandboxes)
        app_id, url = _line(r.out, "app id"), _line(r.out, "url")
        evil = build_app_compose(ComposeRequest(name="evil", compose=EXAMPLE.read_text()))
        evil_hash = hashlib.sha256(evil.encode()).hexdigest()
        status, out = vmmapi.request(state["vmm_url"], "POST", "/prpc/CreateVm", {
            "id": "evil", "name": "evil", "image": "sandbox-busybox", "compose_file": evil,
            "app_id": app_id, "memory": 256, "disk_size": 1})  # fmt: skip
        assert status == 200, out

        def denied() -> str | None:
            for e in _events(home, "dstack.kms.*"):
                boot = e["body"].get("boot_info") or {}
                if e["type"] == "KeyDenied" and boot.get("compose_hash") == evil_hash:
                    return str(e["body"]["reason"])
            return None

        reason = wait_for(denied, timeout=120, what="the KMS to deny the second compose")
        sandboxes["evil"] = _sandbox(home, "evil")
        assert f"compose hash {evil_hash} is not one app {app_id} registered" in reason

        def boot_error() -> dict[str, Any] | None:
            found = [e["body"] for e in _events(home, "dstack.vm.evil")
                     if e["type"] == "VmBootError"]  # fmt: skip
            return found[0] if found else None

        err = wait_for(boot_error, timeout=60, what="the second VM's boot error")
        assert err["error"].startswith("boot error at keys"), err
        assert not any(e["type"] == "AppUpgraded" for e in _events(home, f"dstack.app.{app_id}"))
        regs = [e["body"] for e in _events(home, "dstack.*.*") if e["type"] == "CvmRegistered"]
        assert len([g for g in regs if g["app_id"] == app_id]) == 1  # the victim's only
        assert all(g["compose_hash"] != evil_hash for g in regs)
        for _ in range(20):
            code, body = _get(proxy, url, ca)
            assert code == 200 and body.splitlines()[-1] == "GREETING=victim", body
    finally:
        _remove_vms(home, vms)
        stopped = plane.stop()
        _cleanup(short_tmp, sandboxes)
        assert stopped == 0, plane.text()
