"""The pure parts: deploy/upgrade/remove decisions, the deploy watch, the app story."""

from __future__ import annotations

import json

import pytest

from pydstack.core.apps import (
    AppStory,
    CommandRefused,
    DeployRequest,
    Watch,
    decide_deploy_app,
    decide_remove,
    decide_upgrade,
    plan_deploy,
    step,
    waiting_for,
)
from pydstack.core.events import (
    AppRegistered,
    BootInfo,
    CvmRegistered,
    Event,
    KeyDenied,
    KeyIssued,
    KeyRequested,
    VmBootProgress,
    VmRejected,
    VmRemoveRequested,
    VmRequested,
    VmResources,
    VmScheduled,
    VmStarted,
)
from pydstack.core.projections import Applied, apps, vms

COMPOSE = json.dumps({"manifest_version": 2, "name": "a", "allowed_envs": ["K"]}, indent=4)


def plan(vm_id: str = "v1") -> tuple[str, str, VmRequested]:
    p = plan_deploy(DeployRequest(app_compose=COMPOSE, ports=("8080:80",)), vm_id=vm_id)
    return p.app_id, p.compose_hash, p.request


def at(seq: int, event: Event) -> Applied:
    return Applied(seq, seq * 1000, event)


def test_deploy_registers_a_new_app_and_changes_nothing_for_the_same_compose() -> None:
    p = plan_deploy(DeployRequest(app_compose=COMPOSE), vm_id="v1")
    outcome, event = decide_deploy_app(None, p)
    assert outcome == "registered" and isinstance(event, AppRegistered)
    app = apps.apply(None, at(1, event))
    assert decide_deploy_app(app, p) == ("unchanged", None)


def test_upgrade_updates_live_vms_only_and_refuses_another_app_id() -> None:
    app_id, h, req = plan()
    app = apps.apply(None, at(1, AppRegistered(app_id=app_id, compose_hash=h,
                                                compose=COMPOSE.encode())))  # fmt: skip
    live = vms.apply(None, at(2, req))
    gone = vms.apply(vms.apply(None, at(3, VmRequested(vm_id="v2", app_id=app_id, name="x",
                     resources=VmResources(vcpu=1, memory_mb=64)))),
                     at(4, VmRemoveRequested(vm_id="v2")))  # fmt: skip
    assert live is not None and gone is not None
    new = COMPOSE.replace('"a"', '"b"')
    upgrade, updates = decide_upgrade(app, [live, gone], app_id, new)
    assert upgrade is not None and upgrade.previous_compose_hash == h
    assert [u.vm_id for u in updates] == ["v1"] and updates[0].compose == new.encode()
    assert decide_upgrade(app, [live], app_id, COMPOSE) == (None, [])
    named = json.dumps({"manifest_version": 2, "app_id": "0x" + "ee" * 20})
    with pytest.raises(CommandRefused, match="keeps the app id"):
        decide_upgrade(app, [live], app_id, named)
    removed, removals = decide_remove(app, [live, gone], app_id)
    assert removed.app_id == app_id and [r.vm_id for r in removals] == ["v1"]


def test_watch_reaches_ready_only_after_boot_and_gateway_registration() -> None:
    app_id, h, req = plan()
    w = Watch(app_id=app_id, vm_id="v1", compose_hash=h, gateway_expected=True)
    vm = "dstack.vm.v1"
    stages = []
    for subj, ev in [
        (vm, req), (vm, VmScheduled(vm_id="v1", host="h", cid=3)),
        ("dstack.kms.main", KeyRequested(request_id="r1", app_id=app_id)),
        ("dstack.kms.main", KeyIssued(request_id="r1", boot_info=BootInfo(tcb_status="UpToDate"),
                                      quote_hash="q", backend="dev")),
        (vm, VmStarted(vm_id="v1", host="h")), (vm, VmBootProgress(vm_id="v1", stage="ready")),
    ]:  # fmt: skip
        w, steps = step(w, subj, at(len(stages) + 1, ev))
        stages += [s.stage for s in steps]
    assert stages == ["scheduled", "keys", "started", "boot:ready"]
    assert w.stage == "boot:ready" and "register at a gateway" in waiting_for(w)
    other = CvmRegistered(app_id=app_id, instance_id="i", compose_hash="other", wg_public_key="k",
                          tunnel_ip="10.0.0.2")  # fmt: skip
    w, steps = step(w, "dstack.cvm.i", at(10, other))
    assert steps == []  # another compose of the same app is not this deploy
    w, steps = step(w, "dstack.cvm.i", at(11, msgspec_replace(other, compose_hash=h)))
    assert [s.stage for s in steps] == ["registered", "ready"] and w.stage == "ready"


def msgspec_replace(e: CvmRegistered, **kw: str) -> CvmRegistered:
    import msgspec

    return msgspec.structs.replace(e, **kw)


def test_watch_fails_on_rejection_and_key_denial_naming_the_stage() -> None:
    app_id, h, req = plan()
    w = Watch(app_id=app_id, vm_id="v1", compose_hash=h)
    w, _ = step(w, "dstack.vm.v1", at(1, req))
    failed, steps = step(w, "dstack.vm.v1", at(2, VmRejected(vm_id="v1", reason="no room")))
    assert failed.failed == "the scheduler rejected the VM: no room (at stage requested, seq 2)"
    assert steps[0].stage == "failed"
    w, _ = step(w, "dstack.kms.main", at(3, KeyRequested(request_id="r", app_id=app_id)))
    w, _ = step(w, "dstack.kms.main", at(4, KeyDenied(request_id="r", reason="policy")))
    assert w.failed.startswith("the KMS denied the app keys: policy (at stage requested")
    assert step(w, "dstack.vm.v1", at(5, VmStarted(vm_id="v1", host="h"))) == (w, [])


def test_story_follows_the_app_through_vms_keys_and_gateways_and_skips_others() -> None:
    app_id, h, req = plan()
    story = AppStory(app_id)
    picked = [
        story.take(seq, subj, seq, "a", ev) is not None
        for seq, (subj, ev) in enumerate([
            (f"dstack.app.{app_id}", AppRegistered(app_id=app_id, compose_hash=h)),
            ("dstack.vm.v1", req),
            ("dstack.vm.v9", VmRequested(vm_id="v9", app_id="other", name="o",
                                         resources=VmResources(vcpu=1, memory_mb=64))),
            ("dstack.vm.v1", VmScheduled(vm_id="v1", host="h", cid=3)),
            ("dstack.kms.main", KeyRequested(request_id="r1", app_id=app_id)),
            ("dstack.kms.main", KeyRequested(request_id="r2", app_id="other")),
            ("dstack.kms.main", KeyIssued(request_id="r2", boot_info=BootInfo(tcb_status="x"),
                                          quote_hash="q", backend="dev")),
            ("dstack.kms.main", KeyIssued(request_id="r1", boot_info=BootInfo(tcb_status="x"),
                                          quote_hash="q", backend="webhook")),
            ("dstack.cvm.i", CvmRegistered(app_id=app_id, instance_id="i", compose_hash=h,
                                           wg_public_key="k", tunnel_ip="10.0.0.2")),
        ], 1)
    ]  # fmt: skip
    assert picked == [True, True, False, True, True, False, False, True, True]
    assert "backend webhook" in story.lines[4].text
    assert story.subjects == {f"dstack.app.{app_id}", "dstack.vm.v1", "dstack.kms.main",
                              "dstack.cvm.i"}  # fmt: skip
