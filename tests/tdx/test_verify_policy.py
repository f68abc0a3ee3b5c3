"""Policy decisions on dev-PKI quotes verified by the real dcap-qvl: exact reasons."""

from __future__ import annotations

import hashlib

import pytest

from pydstack.adapters.tdx.simulator import TdMeasurements
from pydstack.adapters.tdx.verify import Policy, Verdict, verify_quote

from .sim_support import NOW, dev_collateral, dev_pki, dev_sim

R = [hashlib.sha384(bytes([i])).digest() for i in range(4)]
MRTD = hashlib.sha384(b"mrtd").digest()
CONFIG_ID = b"\x01" + bytes(47)
M = TdMeasurements(mr_td=MRTD, mr_config_id=CONFIG_ID, rtmrs=(R[0], R[1], R[2], R[3]))


def _verify(
    quote: bytes, policy: Policy, tcb: str = "UpToDate", adv: tuple[str, ...] = ()
) -> Verdict:
    return verify_quote(quote, dev_collateral(tcb, adv), policy, NOW, dev_pki().root_der)


def test_matching_policy_accepts() -> None:
    """All expected measurements equal to the quote's: ok, no reasons."""
    policy = Policy(
        mr_td=MRTD,
        rtmr0=R[0],
        rtmr1=R[1],
        rtmr2=R[2],
        rtmr3=R[3],
        mr_config_id=CONFIG_ID,
        report_data=b"nonce",
    )
    v = _verify(dev_sim().quote(b"nonce", M), policy)
    assert (v.ok, v.reasons, v.tcb_status) == (True, [], "UpToDate")


def test_rtmr_mismatch_reason_is_exact() -> None:
    """A wrong expected RTMR1 names the register and both values."""
    wrong = bytes(48)
    v = _verify(dev_sim().quote(b"", M), Policy(rtmr1=wrong))
    assert v.reasons == [f"rtmr1 mismatch: expected {wrong.hex()}, got {R[1].hex()}"]


def test_several_mismatches_all_listed_in_order() -> None:
    """MRTD, mr_config_id and report_data mismatches are all reported, in a fixed order."""
    v = _verify(
        dev_sim().quote(b"abc", M), Policy(mr_td=R[0], mr_config_id=bytes(48), report_data=b"abd")
    )
    got_rd = (b"abc" + bytes(61)).hex()
    assert v.reasons == [
        f"mr_td mismatch: expected {R[0].hex()}, got {MRTD.hex()}",
        f"mr_config_id mismatch: expected {bytes(48).hex()}, got {CONFIG_ID.hex()}",
        f"report_data mismatch: expected {(b'abd' + bytes(61)).hex()}, got {got_rd}",
    ]


def test_out_of_date_refused_by_default_with_advisories() -> None:
    """OutOfDate with an advisory: both the status and the advisory are reasons."""
    v = _verify(dev_sim().quote(b""), Policy(), "OutOfDate", ("INTEL-SA-00837",))
    assert v.tcb_status == "OutOfDate" and v.advisory_ids == ["INTEL-SA-00837"]
    assert v.reasons == [
        "tcb status OutOfDate not accepted",
        "advisory INTEL-SA-00837 not allowed",
    ]


def test_out_of_date_accepted_when_policy_allows() -> None:
    """Accepting the status and the advisory id makes the same quote pass."""
    policy = Policy(
        accepted_tcb_statuses=frozenset({"UpToDate", "OutOfDate"}),
        allowed_advisory_ids=frozenset({"INTEL-SA-00837"}),
    )
    assert _verify(dev_sim().quote(b""), policy, "OutOfDate", ("INTEL-SA-00837",)).ok


def test_other_advisory_still_refused() -> None:
    """Allowing one advisory does not allow another."""
    policy = Policy(
        accepted_tcb_statuses=frozenset({"SWHardeningNeeded"}),
        allowed_advisory_ids=frozenset({"INTEL-SA-00837"}),
    )
    v = _verify(dev_sim().quote(b""), policy, "SWHardeningNeeded", ("INTEL-SA-00615",))
    assert v.reasons == ["advisory INTEL-SA-00615 not allowed"]


def test_revoked_tcb_is_a_dcap_failure() -> None:
    """A Revoked TCB level is refused by dcap-qvl itself, whatever the policy."""
    policy = Policy(accepted_tcb_statuses=frozenset({"Revoked"}))
    v = _verify(dev_sim().quote(b""), policy, "Revoked")
    assert v.reasons == ["dcap-qvl: Verification failed: TCB status is invalid: Revoked"]


def test_debug_td_refused() -> None:
    """A debug TD is refused by policy; dcap-qvl 0.7.0 also refuses it on its own, so
    allow_debug only removes our reason, never makes a debug quote pass."""
    m = TdMeasurements(td_attributes=bytes.fromhex("0100001000000000"))
    quote = dev_sim().quote(b"", m)
    dcap = "dcap-qvl: Verification failed: Debug mode is enabled"
    assert _verify(quote, Policy()).reasons == [dcap, "debug TD refused"]
    assert _verify(quote, Policy(allow_debug=True)).reasons == [dcap]


def test_policy_rejects_unknown_fields_from_operator_input() -> None:
    """Policy decoded from operator JSON refuses unknown keys (typos must not pass silently)."""
    import msgspec

    with pytest.raises(msgspec.ValidationError, match="rtmr_1"):
        msgspec.json.decode(b'{"rtmr_1": "00"}', type=Policy)


def test_garbage_gives_parse_reason_not_exception() -> None:
    """Non-quote bytes give a verdict with the parse reason."""
    v = _verify(b"\x04\x00", Policy())
    assert v.quote is None and v.reasons == [
        "quote parse: truncated quote: header.att_key_type needs 2 bytes at offset 2, 0 left"
    ]
