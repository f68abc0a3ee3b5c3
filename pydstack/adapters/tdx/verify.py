"""Decide whether a TDX quote is trusted: dcap-qvl for the crypto, a `Policy` for the rest.

dcap-qvl checks the PCK chain, CRLs, TCB info / QE identity signatures and dates, the QE
report and the quote signature, all at an explicit `now`, so an audit can re-run a past
decision with the collateral that was valid then. We never re-implement any of that; we parse
the quote (our typed view of the signed bytes) and apply the policy. The verdict lists every
reason a quote is refused, not only the first.

    verdict = verify_quote(raw, load_collateral(path), Policy(mr_td=expected), now=1751000000)
    if not verdict.ok:
        print("; ".join(verdict.reasons))

Trust anchor: Intel's SGX root (built into dcap-qvl) unless `root_ca_der` is given, which is
how a verifier opts into the simulator's dev root. Production config passes no root.
"""

from __future__ import annotations

from collections.abc import Sequence

import dcap_qvl
import msgspec

from .collateral import Collateral, flatten_error
from .errors import QuoteParseError
from .eventlog import EventLogError, TdxEvent, replay_and_compare
from .quote import Quote, parse_quote

_MEASUREMENTS = ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id")


class Policy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a verifier accepts beyond a valid signature chain. None means "not checked"."""

    accepted_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    allowed_advisory_ids: frozenset[str] = frozenset()
    allow_debug: bool = False
    mr_td: bytes | None = None
    rtmr0: bytes | None = None
    rtmr1: bytes | None = None
    rtmr2: bytes | None = None
    rtmr3: bytes | None = None
    mr_config_id: bytes | None = None
    report_data: bytes | None = None  # compared after zero-padding to 64 bytes


class Verdict(msgspec.Struct, frozen=True):
    """Outcome of `verify_quote`. `ok` is True exactly when `reasons` is empty."""

    ok: bool
    tcb_status: str | None
    advisory_ids: list[str]
    quote: Quote | None
    reasons: list[str]


def dcap_verify(
    raw: bytes, collateral: Collateral, now: int, root_ca_der: bytes | None = None
) -> tuple[str, list[str]]:
    """dcap-qvl's verdict as (tcb_status, advisory_ids); raises ValueError with its reason."""
    if root_ca_der is None:
        report = dcap_qvl.verify(raw, collateral, now)
    else:
        report = dcap_qvl.verify_with_root_ca(raw, collateral, root_ca_der, now)
    return str(report.status), [str(a) for a in report.advisory_ids]


def policy_reasons(
    quote: Quote, policy: Policy, tcb_status: str | None, advisory_ids: Sequence[str]
) -> list[str]:
    """Every way `quote` (with dcap-qvl's TCB result, if any) violates `policy`."""
    reasons: list[str] = []
    if tcb_status is not None and tcb_status not in policy.accepted_tcb_statuses:
        reasons.append(f"tcb status {tcb_status} not accepted")
    for adv in advisory_ids:
        if adv not in policy.allowed_advisory_ids:
            reasons.append(f"advisory {adv} not allowed")
    if quote.debug and not policy.allow_debug:
        reasons.append("debug TD refused")
    report = quote.report
    for name in _MEASUREMENTS:
        expected: bytes | None = getattr(policy, name)
        got: bytes = getattr(report, name)
        if expected is not None and expected != got:
            reasons.append(f"{name} mismatch: expected {expected.hex()}, got {got.hex()}")
    if policy.report_data is not None:
        expected = policy.report_data.ljust(64, b"\x00")
        if expected != report.report_data:
            reasons.append(
                f"report_data mismatch: expected {expected.hex()}, got {report.report_data.hex()}"
            )
    return reasons


def verify_quote(
    raw: bytes,
    collateral: Collateral,
    policy: Policy,
    now: int,
    root_ca_der: bytes | None = None,
    *,
    event_log: Sequence[TdxEvent] | None = None,
) -> Verdict:
    """Verify `raw` at unix time `now`; never raises for a bad quote, the verdict says why.

    With `event_log`, the log is replayed (eventlog.replay_and_compare) and must reproduce the
    quote's RTMR0-3, runtime events included, else each mismatch is a reason.
    """
    try:
        quote = parse_quote(raw)
    except QuoteParseError as e:
        return Verdict(False, None, [], None, [f"quote parse: {e}"])
    reasons: list[str] = []
    tcb_status: str | None = None
    advisory_ids: list[str] = []
    try:
        tcb_status, advisory_ids = dcap_verify(raw, collateral, now, root_ca_der)
    except ValueError as e:
        reasons.append(f"dcap-qvl: {flatten_error(str(e))}")
    # Policy checks run even after a dcap-qvl failure, so one verdict lists every problem;
    # ok stays False whenever the signature chain failed.
    reasons += policy_reasons(quote, policy, tcb_status, advisory_ids)
    if event_log is not None:
        try:
            reasons += replay_and_compare(event_log, quote.report.rtmrs).reasons
        except EventLogError as e:
            reasons.append(f"event log: {e}")
    return Verdict(not reasons, tcb_status, advisory_ids, quote, reasons)
