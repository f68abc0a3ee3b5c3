"""The KMS aggregate fold and the audit of its decisions. Pure.

Decision: every ``KeyRequested`` carries the whole SCALE attestation the client presented
(quote, event log, runtime events, sys config: all public), the verifier policy as JSON and
the unix time it was verified at. An auditor can therefore re-run the exact check
(`Recheck`, provided by the attestation adapter) and compare: the quote hash, the BootInfo
and an empty list of reasons must all come out the same. Collateral is not stored on the log
(it is large and shared); the auditor supplies the collateral valid at ``verified_at``.

    state = fold(events)                       # root, replicas, open/duplicate requests
    cut_off = undecided(entries, actor="kms-main")  # a restarted KMS's dangling requests
    problems = audit_kms_log(events, recheck)  # [] when every KeyIssued re-verifies
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec

from pydstack.core.events.kms import (
    BootInfo,
    KeyDenied,
    KeyIssued,
    KeyRequested,
    KmsReplicaOnboarded,
    KmsRootCreated,
)

# (attestation, vm_config, policy JSON, verified_at) -> (reasons, BootInfo or None, quote hash)
Recheck = Callable[[bytes, str, str, int], tuple[list[str], BootInfo | None, str]]
# (attestation, re-derived BootInfo) -> that BootInfo with dstack's boot-time measurements,
# what SignCert decides on (actors/kms/certgrants.boot_time_of)
BootTime = Callable[[bytes, BootInfo], BootInfo]


class KmsState(msgspec.Struct, frozen=True):
    root: KmsRootCreated | None = None
    replicas: tuple[str, ...] = ()
    requested: frozenset[str] = frozenset()
    decided: frozenset[str] = frozenset()
    issued: int = 0
    denied: int = 0
    duplicates: tuple[str, ...] = ()  # request ids seen twice (requested or decided)

    @property
    def open_requests(self) -> frozenset[str]:
        """Requests on the log without a decision: in flight, or their KMS died mid-request
        (a restarted KMS closes its own with a KeyDenied)."""
        return self.requested - self.decided


def apply(state: KmsState, event: object) -> KmsState:
    r = msgspec.structs.replace
    match event:
        case KmsRootCreated() if state.root is None:
            return r(state, root=event)
        case KmsReplicaOnboarded(replica_id=rid) if rid not in state.replicas:
            return r(state, replicas=(*state.replicas, rid))
        case KeyRequested(request_id=rid):
            if rid in state.requested:
                return r(state, duplicates=(*state.duplicates, rid))
            return r(state, requested=state.requested | {rid})
        case KeyIssued(request_id=rid) | KeyDenied(request_id=rid):
            if rid in state.decided:
                return r(state, duplicates=(*state.duplicates, rid))
            issued = 1 if isinstance(event, KeyIssued) else 0
            return r(
                state,
                decided=state.decided | {rid},
                issued=state.issued + issued,
                denied=state.denied + 1 - issued,
            )
        case _:
            return state


def fold(events: Iterable[object], state: KmsState | None = None) -> KmsState:
    state = state or KmsState()
    for ev in events:
        state = apply(state, ev)
    return state


def undecided(
    entries: Iterable[tuple[str, object]], actor: str, instance: str = ""
) -> list[KeyRequested]:
    """The KeyRequested events of `actor`'s KMS `instance` that have no decision, in log order.

    `entries` are (writing actor, event). A KMS that starts has nothing in flight, so every
    undecided request written under its own actor name and instance id was cut off by its
    previous life; replicas sharing an identity differ by instance id.
    """
    pending: dict[str, KeyRequested] = {}
    for who, ev in entries:
        if isinstance(ev, KeyRequested) and who == actor and ev.kms_instance == instance:
            pending.setdefault(ev.request_id, ev)
        elif isinstance(ev, KeyIssued | KeyDenied):
            pending.pop(ev.request_id, None)
    return list(pending.values())


def audit_key_issued(
    requested: KeyRequested, issued: KeyIssued, recheck: Recheck, boot_time: BootTime | None = None
) -> list[str]:
    """Re-verify one KeyIssued against its recorded evidence; [] when it holds. `boot_time`:
    how a SignCert decision's boot-time measurements are re-derived (None: taken as
    recorded, every other field re-checked)."""
    rid = issued.request_id
    if requested.request_id != rid:
        return [f"{rid}: KeyIssued paired with KeyRequested {requested.request_id}"]
    problems: list[str] = []
    if not requested.attestation:
        return [f"{rid}: KeyRequested has no attestation to re-check"]
    if not requested.policy:
        problems.append(f"{rid}: no policy recorded")
    reasons, boot, qh = recheck(
        requested.attestation, requested.vm_config, requested.policy, requested.verified_at
    )
    if qh != issued.quote_hash or qh != requested.quote_hash:
        problems.append(f"{rid}: quote hash {qh} differs from the recorded {issued.quote_hash}")
    problems += [f"{rid}: re-verification refuses: {reason}" for reason in reasons]
    if boot is not None and requested.method == "SignCert":
        # SignCert decides on dstack's boot-time view (RTMR3 up to boot-mr-done, no key
        # provider); the re-check derives the current one.
        if boot_time is not None:
            boot = boot_time(requested.attestation, boot)
        else:
            recorded = issued.boot_info
            boot = msgspec.structs.replace(
                boot, mr_aggregated=recorded.mr_aggregated, mr_system=recorded.mr_system
            )
    if boot != issued.boot_info:
        problems.append(f"{rid}: re-derived BootInfo differs from the recorded one")
    if not issued.backend:
        problems.append(f"{rid}: no authorization backend recorded")
    return problems


def audit_kms_log(
    events: Iterable[object], recheck: Recheck, boot_time: BootTime | None = None
) -> list[str]:
    """Audit a KMS aggregate: pairing, duplicates, and a re-check of every KeyIssued
    (`boot_time`: as in `audit_key_issued`)."""
    problems: list[str] = []
    requests: dict[str, KeyRequested] = {}
    state = KmsState()
    for ev in events:
        state = apply(state, ev)
        if isinstance(ev, KeyRequested):
            requests.setdefault(ev.request_id, ev)
        elif isinstance(ev, KeyIssued | KeyDenied):
            req = requests.get(ev.request_id)
            if req is None:
                problems.append(f"{ev.request_id}: decision without a KeyRequested before it")
            elif isinstance(ev, KeyIssued):
                problems += audit_key_issued(req, ev, recheck, boot_time)
    problems += [f"{rid}: appears twice" for rid in state.duplicates]
    problems += [
        f"{rid}: requested but not decided (in flight, or its KMS died and has not restarted)"
        for rid in sorted(state.open_requests)
    ]
    return problems
