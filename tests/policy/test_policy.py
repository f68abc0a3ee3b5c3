"""The write policy and the keyring as pure functions: the verdict on hand-built logs."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from pydstack.core.audit import subject_matches
from pydstack.core.events import (
    EVENT_TYPES,
    AppRegistered,
    AppRemoved,
    AppUpgraded,
    Envelope,
    HostHeartbeat,
    HostJoined,
    HostVmPlaced,
    KeyRevoked,
    KeyringEntryAdded,
    KmsRootCreated,
    VmExited,
    VmRequested,
    VmStarted,
    VmStopped,
    VmStopRequested,
    tag_of,
)
from pydstack.core.policy import (
    KEYRING_SUBJECT,
    POLICY,
    ROLES,
    WRITERS,
    Allowed,
    Gate,
    Keyring,
    Refused,
    Verdict,
    additions,
)
from tests.policy.given import (
    ADMIN,
    GATEWAY,
    KMS,
    OPERATOR,
    RES,
    SCHEDULER,
    STRANGER,
    TENANT_A,
    TENANT_B,
    VMM1,
    VMM2,
    Log,
    entry,
    placed,
    requested,
    signer,
)
from tests.projections.projections_given import Message


def judge_all(log: Log, anchor: bytes | None = ADMIN.public_key) -> dict[int, Verdict]:
    gate = Gate.pinned(anchor)
    return {seq: gate.judge(seq, subj, data) for seq, subj, data in log.records}


def reason(v: Verdict) -> str:
    return v.reason if isinstance(v, Refused) else "allowed"


# -- the table ---------------------------------------------------------------------------------


def test_every_event_type_has_a_writer_and_every_writer_may_publish_there() -> None:
    """The read-time table never allows what NATS refuses at publish time (and vice versa no
    type is left writable by nobody)."""
    assert {t for t, _ in WRITERS} == {tag_of(t) for t in EVENT_TYPES}
    for (_, kind), roles in WRITERS.items():
        for role in roles:
            assert any(subject_matches(p, f"dstack.{kind}.x") for p in ROLES[role].subjects), (
                role,
                kind,
            )


def test_the_scheduler_alone_places_and_the_vmm_alone_reports() -> None:
    assert POLICY.may_write("scheduler", "VmScheduled", "vm")
    for role in ("operator", "vmm", "admin", "kms", "gateway", "auditor"):
        assert not POLICY.may_write(role, "VmScheduled", "vm")
    assert POLICY.may_write("vmm", "VmStarted", "vm")
    assert not POLICY.may_write("operator", "VmStarted", "vm")
    assert not POLICY.may_write("vmm", "VmStarted", "host")  # type x kind, not type alone
    assert not POLICY.may_write("auditor", "VmRequested", "vm")


# -- before and at the keyring -------------------------------------------------------------------


def test_a_log_without_keyring_is_pre_keyring_signature_still_checked() -> None:
    log = Log()
    ok = log.add(STRANGER, "dstack.vm.a", placed("a", "h1"))
    forged = log.add(STRANGER, "dstack.vm.a", VmStopped(vm_id="a"), zero_sig=True)
    got = judge_all(log)
    assert isinstance(got[ok], Allowed) and got[ok].pre_keyring
    assert reason(got[forged]) == "bad-signature"


def test_events_before_the_keyring_stay_pre_keyring_and_after_it_the_policy_holds() -> None:
    log = Log()
    old = log.add(OPERATOR, "dstack.vm.a", placed("a", "h1"))  # written by anyone, back then
    log.everyone()
    new = log.add(OPERATOR, "dstack.vm.b", placed("b", "h1"))
    got = judge_all(log)
    assert isinstance(got[old], Allowed) and got[old].pre_keyring
    assert reason(got[new]) == "not-allowed"


def test_the_first_entry_must_be_signed_by_the_pinned_admin_key() -> None:
    log = Log()
    fake = log.add(STRANGER, KEYRING_SUBJECT, entry(STRANGER, "admin"))
    later = log.add(STRANGER, "dstack.vm.a", requested("a"))
    got = judge_all(log)
    assert reason(got[fake]) == "not-allowed"
    assert isinstance(got[later], Allowed) and got[later].pre_keyring  # no keyring yet


def test_unpinned_the_first_entry_must_be_an_admin_binding_its_own_key() -> None:
    log = Log()
    other = log.add(ADMIN, KEYRING_SUBJECT, entry(OPERATOR))  # not its own key
    own = log.add(ADMIN, KEYRING_SUBJECT, entry(ADMIN))
    got = judge_all(log, anchor=None)
    assert (reason(got[other]), reason(got[own])) == ("not-allowed", "allowed")


def test_only_an_admin_changes_the_keyring_and_entries_must_make_sense() -> None:
    log = Log()
    log.keyring(OPERATOR)
    by_operator = log.add(OPERATOR, KEYRING_SUBJECT, entry(STRANGER, "operator"))
    bad_role = log.add(ADMIN, KEYRING_SUBJECT, KeyringEntryAdded(key=STRANGER.public_key,
                                                                name="s", role="root"))  # fmt: skip
    hosts_for_kms = log.add(ADMIN, KEYRING_SUBJECT, KeyringEntryAdded(
        key=KMS.public_key, name="kms", role="kms", hosts=("h1",)))  # fmt: skip
    revoke_anchor = log.add(ADMIN, KEYRING_SUBJECT, KeyRevoked(key=ADMIN.public_key))
    got = judge_all(log)
    assert reason(got[by_operator]) == "not-allowed"
    assert reason(got[bad_role]) == reason(got[hosts_for_kms]) == "bad-keyring-entry"
    assert reason(got[revoke_anchor]) == "bad-keyring-entry"


# -- roles, owners, revocation -------------------------------------------------------------------


def test_an_unknown_key_a_wrong_role_and_a_zeroed_signature_are_refused() -> None:
    log = Log()
    log.everyone()
    log.add(OPERATOR, "dstack.vm.v", requested("v"))
    unknown = log.add(STRANGER, "dstack.vm.v", placed("v", "h1"))
    wrong_role = log.add(OPERATOR, "dstack.vm.v", placed("v", "h1"))
    other_vmm = log.add(VMM2, "dstack.vm.v", placed("v", "h1"))
    zeroed = log.add(SCHEDULER, "dstack.vm.v", placed("v", "h1"), zero_sig=True)
    good = log.add(SCHEDULER, "dstack.vm.v", placed("v", "h1"))
    got = judge_all(log)
    assert [reason(got[s]) for s in (unknown, wrong_role, other_vmm, zeroed, good)] == [
        "unknown-signer", "not-allowed", "not-allowed", "bad-signature", "allowed",
    ]  # fmt: skip


def test_a_vmm_writes_only_its_own_host_and_the_vms_placed_on_it() -> None:
    log = Log()
    log.everyone()
    log.add(OPERATOR, "dstack.vm.a", requested("a"))
    log.add(SCHEDULER, "dstack.vm.a", placed("a", "h1"))
    mine = log.add(VMM1, "dstack.vm.a", VmStarted(vm_id="a", host="h1"))
    theirs = log.add(VMM2, "dstack.vm.a", VmExited(vm_id="a", reason="x"))
    names_other = log.add(VMM1, "dstack.vm.a", VmStarted(vm_id="a", host="h2"))
    own_host = log.add(VMM1, "dstack.host.h1", HostJoined(host_id="h1"))
    other_host = log.add(VMM1, "dstack.host.h2", HostHeartbeat(host_id="h2"))
    never = log.add(VMM1, "dstack.vm.zz", VmStopped(vm_id="zz"))
    pinned_elsewhere = log.add(VMM1, "dstack.vm.b", requested("b", host="h2"))
    pinned_here = log.add(VMM1, "dstack.vm.c", requested("c", host="h1"))
    stop_own = log.add(VMM1, "dstack.vm.c", VmStopRequested(vm_id="c"))  # its API, own VM
    stop_other = log.add(VMM2, "dstack.vm.c", VmStopRequested(vm_id="c"))
    update = log.add(VMM1, "dstack.host.h1", HostVmPlaced(host_id="h1", vm_id="a", cid=1000,
                                                          resources=RES))  # fmt: skip
    got = judge_all(log)
    assert reason(got[mine]) == reason(got[own_host]) == reason(got[pinned_here]) == "allowed"
    assert reason(got[stop_own]) == reason(got[update]) == "allowed"
    for seq in (theirs, names_other, other_host, never, pinned_elsewhere, stop_other):
        assert reason(got[seq]) == "not-owner", seq


def test_the_body_must_be_about_the_subject_it_is_stored_on() -> None:
    log = Log()
    log.everyone()
    log.add(OPERATOR, "dstack.vm.a", requested("a"))
    log.add(SCHEDULER, "dstack.vm.a", placed("a", "h1"))
    smuggled = log.add(VMM1, "dstack.vm.a", VmStopped(vm_id="b"))  # a's subject, b's body
    app = log.add(OPERATOR, "dstack.app.x", AppRegistered(app_id="y", compose_hash="h"))
    got = judge_all(log)
    assert reason(got[smuggled]) == reason(got[app]) == "aggregate-mismatch"


def test_a_revoked_key_is_refused_from_then_on_its_past_events_stay_valid() -> None:
    log = Log()
    log.everyone()
    before = log.add(KMS, "dstack.kms.main", KmsRootCreated(cluster="main",
                     ca_public_key=b"", k256_public_key=b""))  # fmt: skip
    log.add(ADMIN, KEYRING_SUBJECT, KeyRevoked(key=KMS.public_key, reason="host gone"))
    after = log.add(KMS, "dstack.kms.main", KmsRootCreated(cluster="main",
                    ca_public_key=b"", k256_public_key=b""))  # fmt: skip
    got = judge_all(log)
    assert (reason(got[before]), reason(got[after])) == ("allowed", "revoked-signer")


def test_an_event_is_judged_by_the_keyring_at_its_own_sequence() -> None:
    """A reader of one aggregate loads the whole keyring first: a key bound later does not
    make an earlier event of it valid, a revocation later does not make it invalid."""
    log = Log()
    log.keyring(OPERATOR)
    early = log.add(GATEWAY, "dstack.gateway.g", KeyRevoked(key=b"x"))  # any type: unknown key
    log.add(ADMIN, KEYRING_SUBJECT, entry(GATEWAY))
    ok = log.add(OPERATOR, "dstack.app.a", AppRegistered(app_id="a", compose_hash="h"))
    log.add(ADMIN, KEYRING_SUBJECT, KeyRevoked(key=OPERATOR.public_key))
    gate = Gate.pinned(ADMIN.public_key)
    for rec in log.records:  # the keyring subject first, as a reader of one aggregate does
        if rec[1] == KEYRING_SUBJECT:
            gate.judge(*rec)
    by_seq = {seq: (subj, data) for seq, subj, data in log.records}
    assert reason(gate.judge(early, *by_seq[early])) == "unknown-signer"
    assert reason(gate.judge(ok, *by_seq[ok])) == "allowed"


def test_a_type_this_version_does_not_know_is_allowed_unfolded() -> None:
    """A newer writer's type from a bound key: nothing here folds it (the auditor warns)."""
    log = Log()
    log.everyone()
    seq = log.add(OPERATOR, "dstack.vm.a", requested("a"))
    env = msgspec.msgpack.decode(log.records[-1][2][:-64], type=Envelope)
    body = msgspec.Raw(msgspec.msgpack.encode({"type": "VmTeleported"}))
    raw = msgspec.msgpack.encode(msgspec.structs.replace(env, type="VmTeleported", body=body))
    log.records[-1] = (seq, "dstack.vm.a", raw + OPERATOR.sign(raw))
    v = judge_all(log)[seq]
    assert isinstance(v, Allowed) and v.event is None


# -- the gate's state ------------------------------------------------------------------------------


def test_the_gate_learns_owners_from_the_pin_then_the_placement_only() -> None:
    log = Log()
    log.everyone()
    log.add(VMM1, "dstack.vm.a", requested("a", host="h1"))
    log.add(OPERATOR, "dstack.vm.a", requested("a", host="h2"))  # a repeat changes nothing
    gate = Gate.pinned(ADMIN.public_key)
    for rec in log.records:
        gate.judge(*rec)
    assert gate.owners == {"a": "h1", "vmapp.a": "app"}  # and the app it was requested under
    gate.take_owner_changes()
    log.add(SCHEDULER, "dstack.vm.a", placed("a", "h2"))
    gate.judge(*log.records[-1])
    assert gate.owners == {"a": "h2", "vmapp.a": "app"} and gate.take_owner_changes() == {"a": "h2"}
    assert gate.take_owner_changes() == {}


def test_pinning_another_admin_key_than_the_log_is_anchored_to_fails() -> None:
    log = Log()
    log.everyone()
    gate = Gate()
    for rec in log.records:
        gate.judge(*rec)
    gate.pin(ADMIN.public_key)  # the same: fine
    with pytest.raises(ValueError, match="another admin key"):
        gate.pin(signer("x", 9).public_key)


def test_additions_start_with_the_admin_merge_hosts_and_keep_revocations() -> None:
    ring = Keyring()
    wanted = [(OPERATOR.public_key, "operator", "operator", ()),
              (ADMIN.public_key, "admin", "admin", ()),
              (VMM1.public_key, "vmm", "vmm", ("h1",))]  # fmt: skip
    first = additions(ring, wanted)
    assert [e.role for e in first] == ["admin", "operator", "vmm"]
    log = Log()
    for e in first:
        log.add(ADMIN, KEYRING_SUBJECT, e)
    gate = Gate.pinned(ADMIN.public_key)
    for rec in log.records:
        assert isinstance(gate.judge(*rec), Allowed)
    assert additions(gate.keyring, wanted) == []
    more = additions(gate.keyring, [(VMM1.public_key, "vmm", "vmm", ("h2",))])
    assert [e.hosts for e in more] == [("h1", "h2")]
    log.add(ADMIN, KEYRING_SUBJECT, KeyRevoked(key=OPERATOR.public_key))
    gate.judge(*log.records[-1])
    assert additions(gate.keyring, wanted) == []  # revoked stays revoked


def test_a_read_model_keeps_the_keyring_and_owners_with_its_checkpoint(tmp_path: Path) -> None:
    """Reopened, it judges the next events as one pass over the whole log would."""
    from pydstack.adapters.sqlite import ReadModel

    log = Log()
    log.everyone()
    log.add(OPERATOR, "dstack.vm.a", requested("a"))
    log.add(SCHEDULER, "dstack.vm.a", placed("a", "h1"))
    first = len(log.records)
    log.add(VMM2, "dstack.vm.a", VmStarted(vm_id="a", host="h2"))  # another host's VMM
    log.add(VMM1, "dstack.vm.a", VmStarted(vm_id="a", host="h1"))
    msgs = [Message(seq, data, subject=subj) for seq, subj, data in log.records]
    with ReadModel.open(tmp_path / "rm.db", anchor=ADMIN.public_key) as rm:
        rm.apply_messages(msgs[:first])
    with ReadModel.open(tmp_path / "rm.db", anchor=ADMIN.public_key) as rm:
        got = rm.apply_messages(msgs[first:])
        vm = rm.get_vm("a")
    assert (got.refused, got.applied) == (1, 1)
    assert vm is not None and (vm.state, vm.host) == ("starting", "h1")
    with (
        pytest.raises(ValueError, match="another admin key"),
        ReadModel.open(tmp_path / "rm.db", anchor=STRANGER.public_key),
    ):
        pass


# -- app owners and tenants ----------------------------------------------------------------------


def _vm(vm_id: str, app_id: str) -> VmRequested:
    return VmRequested(vm_id=vm_id, app_id=app_id, name=vm_id, resources=RES)


def _up(app_id: str, h: str) -> AppUpgraded:
    return AppUpgraded(app_id=app_id, compose_hash=h, previous_compose_hash="c")


def _reg(app_id: str) -> AppRegistered:
    return AppRegistered(app_id=app_id, compose_hash="c")


def test_an_app_is_its_first_registrants_and_admins_only() -> None:
    log = Log()
    log.keyring(OPERATOR, TENANT_A, TENANT_B)
    x, y = "dstack.app.x", "dstack.app.y"
    seqs = {
        "b upgrades x before it exists": log.add(TENANT_B, x, _up("x", "b0")),
        "a registers x": log.add(TENANT_A, x, _reg("x")),
        "b upgrades x": log.add(TENANT_B, x, _up("x", "b")),
        "b registers x again": log.add(TENANT_B, x, _reg("x")),
        "operator upgrades x": log.add(OPERATOR, x, _up("x", "o")),
        "b removes x": log.add(TENANT_B, x, AppRemoved(app_id="x")),
        "a upgrades x": log.add(TENANT_A, x, _up("x", "a")),
        "admin upgrades x": log.add(ADMIN, x, _up("x", "adm")),
        "operator registers y": log.add(OPERATOR, y, _reg("y")),
        "operator upgrades y": log.add(OPERATOR, y, _up("y", "d")),
        "b runs a vm of x": log.add(TENANT_B, "dstack.vm.v1", _vm("v1", "x")),
        "a runs a vm of x": log.add(TENANT_A, "dstack.vm.v2", _vm("v2", "x")),
        "operator runs a vm of x": log.add(OPERATOR, "dstack.vm.v3", _vm("v3", "x")),
        "b stops a's vm": log.add(TENANT_B, "dstack.vm.v2", VmStopRequested(vm_id="v2")),
        "a stops the operator's vm of x": log.add(TENANT_A, "dstack.vm.v3",
                                                 VmStopRequested(vm_id="v3")),
        "a runs a vm of y": log.add(TENANT_A, "dstack.vm.v4", _vm("v4", "y")),
    }  # fmt: skip
    v = judge_all(log)
    got = {what: reason(v[s]) for what, s in seqs.items()}
    allowed = {"a registers x", "a upgrades x", "admin upgrades x", "operator registers y",
               "operator upgrades y", "a runs a vm of x", "operator runs a vm of x",
               "a stops the operator's vm of x"}  # fmt: skip
    assert got == {w: "allowed" if w in allowed else "not-owner" for w in seqs}


def test_app_owners_are_a_timeline_whatever_order_they_are_learnt_in() -> None:
    """A partial reader may learn an app's registration before judging an earlier event:
    the event still sees no owner (the owner entry carries its registration's sequence)."""
    log = Log()
    log.keyring(TENANT_A)
    early = log.add(TENANT_A, "dstack.vm.v", _vm("v", "x"))
    log.add(TENANT_A, "dstack.app.x", _reg("x"))
    gate = Gate.pinned(ADMIN.public_key)
    for rec in log.records[:-2]:  # the keyring
        gate.judge(*rec)
    gate.judge(*log.records[-1])  # the registration, learnt first
    assert reason(gate.judge(*log.records[early - 1])) == "not-owner"
