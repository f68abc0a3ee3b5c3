"""The auditor: a valid log passes; any tampering is named by its stream sequence."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from pydstack.core.audit import Auditor, Finding, Signatory, audit, make_keyring, subject_matches
from pydstack.core.events import (
    Envelope,
    Signer,
    VmRejected,
    VmRequested,
    VmResources,
    message_hash,
    seal,
)

SCHED = Signer.from_private_bytes("scheduler", bytes(range(32)))
OPER = Signer.from_private_bytes("operator", bytes(range(1, 33)))
KEYRING = make_keyring(
    [
        Signatory("scheduler", SCHED.public_key, ("dstack.vm.*", "dstack.host.*")),
        Signatory("operator", OPER.public_key, ("dstack.vm.*", "dstack.app.*")),
    ]
)
SUBJECTS = ("dstack.vm.a", "dstack.vm.b", "dstack.vm.c")
Log = list[tuple[int, str, bytes]]


def build_log(plan: list[tuple[int, bool]]) -> Log:
    """A valid log: each step appends to one of SUBJECTS, signed by operator or scheduler."""
    heads: dict[str, bytes] = {}
    out: Log = []
    for seq, (which, by_scheduler) in enumerate(plan, 1):
        subj = SUBJECTS[which]
        event = (
            VmRejected(vm_id=subj, reason=f"r{seq}")
            if by_scheduler
            else VmRequested(
                vm_id=subj, app_id="app", name="n", resources=VmResources(vcpu=1, memory_mb=512)
            )
        )
        data = seal(
            SCHED if by_scheduler else OPER,
            event,
            subject=subj,
            event_id=f"e{seq}",
            time_ns=seq,
            correlation="c",
            prev=heads.get(subj, b""),
        )
        heads[subj] = message_hash(data)
        out.append((seq, subj, data))
    return out


plans = st.lists(
    st.tuples(st.integers(0, len(SUBJECTS) - 1), st.booleans()), min_size=1, max_size=25
)


def run(log: Log, last: int) -> list[Finding]:
    return list(audit(log, keyring=KEYRING, first_seq=1, last_seq=last))


def named(findings: list[Finding]) -> set[int]:
    """Every sequence a finding names (a gap names its whole range)."""
    out: set[int] = set()
    for f in findings:
        out.update(range(f.seq, max(f.seq, f.last_seq) + 1))
    return out


@given(plans)
def test_a_valid_log_has_no_findings(plan: list[tuple[int, bool]]) -> None:
    log = build_log(plan)
    assert run(log, len(log)) == []


@settings(max_examples=300)
@given(plans, st.data())
def test_any_flipped_byte_is_named_by_its_sequence(
    plan: list[tuple[int, bool]], data: st.DataObject
) -> None:
    log = build_log(plan)
    i = data.draw(st.integers(0, len(log) - 1))
    seq, subj, raw = log[i]
    pos = data.draw(st.integers(0, len(raw) - 1))
    mask = data.draw(st.integers(1, 255))
    bad = bytearray(raw)
    bad[pos] ^= mask
    log[i] = (seq, subj, bytes(bad))
    findings = run(log, len(log))
    assert any(f.seq == seq and f.severity == "error" for f in findings), findings


@given(plans.filter(lambda p: len(p) >= 2), st.data())
def test_any_dropped_event_is_named_as_a_gap(
    plan: list[tuple[int, bool]], data: st.DataObject
) -> None:
    log = build_log(plan)
    i = data.draw(st.integers(0, len(log) - 1))
    dropped = log.pop(i)[0]
    findings = run(log, len(plan))
    assert any(f.code == "gap" and f.seq <= dropped <= max(f.seq, f.last_seq) for f in findings)


@given(plans.filter(lambda p: len(p) >= 2), st.data())
def test_any_reordering_is_named(plan: list[tuple[int, bool]], data: st.DataObject) -> None:
    log = build_log(plan)
    shuffled = data.draw(st.permutations(log).filter(lambda p: p != log))
    moved = {rec[0] for pos, rec in enumerate(shuffled) if rec != log[pos]}
    findings = run(shuffled, len(log))
    assert named(findings) & moved, findings


def test_a_forged_signature_names_the_seq_and_says_why() -> None:
    log = build_log([(0, False), (0, True)])
    seq, subj, raw = log[1]
    log[1] = (seq, subj, raw[:-64] + bytes(64))
    reasons = [f.reason for f in run(log, 2)]
    assert reasons == [reasons[0]] and reasons[0].startswith("seq 2: bad signature")


def test_a_wrong_prev_names_the_previous_seq_on_the_subject() -> None:
    log = build_log([(0, False), (1, False)])
    forged = seal(
        OPER,
        VmRejected(vm_id="a", reason="x"),
        subject="dstack.vm.a",
        event_id="f",
        time_ns=3,
        correlation="c",
        prev=b"\x01" * 32,
    )
    log.append((3, "dstack.vm.a", forged))
    [finding] = run(log, 3)
    assert finding.code == "prev-mismatch"
    assert finding.reason.startswith("seq 3: prev hash does not match seq 1,")


def test_a_deleted_last_message_is_found_from_the_stream_last_seq() -> None:
    log = build_log([(0, False), (1, False), (2, False)])
    [finding] = run(log[:2], 3)
    assert (finding.code, finding.seq) == ("gap", 3)


def test_a_signer_outside_its_subjects_is_refused() -> None:
    data = seal(
        SCHED,
        VmRejected(vm_id="k", reason="x"),
        subject="dstack.kms.k",
        event_id="x",
        time_ns=1,
        correlation="c",
    )
    [finding] = run([(1, "dstack.kms.k", data)], 1)
    assert finding.code == "not-allowed"
    assert "'scheduler' may not write dstack.kms.k" in finding.reason


def test_an_unknown_key_is_reported() -> None:
    stranger = Signer.from_private_bytes("scheduler", bytes(32))
    data = seal(
        stranger,
        VmRejected(vm_id="a", reason="x"),
        subject="dstack.vm.a",
        event_id="x",
        time_ns=1,
        correlation="c",
    )
    assert [f.code for f in run([(1, "dstack.vm.a", data)], 1)] == ["unknown-signer"]


def _resign(env: Envelope, signer: Signer) -> bytes:
    raw = msgspec.msgpack.encode(env)
    return raw + signer.private_key.sign(raw)


def test_body_tag_must_match_envelope_type_and_unknown_types_only_warn() -> None:
    data = seal(
        OPER,
        VmRejected(vm_id="a", reason="x"),
        subject="dstack.vm.a",
        event_id="x",
        time_ns=1,
        correlation="c",
    )
    env = msgspec.msgpack.decode(data[:-64], type=Envelope)
    lying = _resign(msgspec.structs.replace(env, type="VmStopped"), OPER)
    newer = _resign(
        msgspec.structs.replace(
            env,
            type="VmTeleported",
            body=msgspec.Raw(msgspec.msgpack.encode({"type": "VmTeleported"})),
        ),
        OPER,
    )
    [f1] = run([(1, "dstack.vm.a", lying)], 1)
    assert f1.code == "type-mismatch"
    [f2] = run([(1, "dstack.vm.a", newer)], 1)
    assert (f2.code, f2.severity) == ("unknown-type", "warning")


def test_garbage_on_the_stream_is_unparseable_not_a_crash() -> None:
    assert [f.code for f in run([(1, "dstack.vm.a", b"not msgpack at all")], 1)] == ["unparseable"]


def test_summary_counts_events_aggregates_and_signers() -> None:
    log = build_log([(0, False), (0, True), (1, False)])
    auditor = Auditor(keyring=KEYRING, first_seq=1)
    for rec in log:
        assert auditor.check(*rec) == []
    assert auditor.finish(3) == []
    s = auditor.summary()
    signers = {"operator": 2, "scheduler": 1}
    assert (s.events, s.aggregates, s.signers, s.ok) == (3, 2, signers, True)


def test_subject_wildcards_follow_nats() -> None:
    assert subject_matches("dstack.vm.*", "dstack.vm.x")
    assert not subject_matches("dstack.vm.*", "dstack.vm.x.y")
    assert subject_matches("dstack.>", "dstack.vm.x")
    assert not subject_matches("dstack.>", "dstack")
    assert not subject_matches("dstack.vm.*", "dstack.host.x")
