"""Every shared vector gives its documented dcap-qvl result through `verify_quote`."""

from __future__ import annotations

import json

import dcap_qvl
import pytest

from pydstack.adapters.tdx.verify import Policy, verify_quote

from .sim_support import (
    NOW,
    OUTDATED_NOW,
    dstack_quote,
    intel_sample,
    outdated_collateral,
    vector,
)


@pytest.mark.parametrize("now", [NOW, 1750329147, 1752919234])
def test_intel_sample_up_to_date_inside_window(now: int) -> None:
    """The Intel sample is UpToDate with no advisories anywhere in its collateral window."""
    quote, coll = intel_sample()
    v = verify_quote(quote, coll, Policy(), now)
    assert (v.ok, v.tcb_status, v.advisory_ids, v.reasons) == (True, "UpToDate", [], [])


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        (1750329146, "dcap-qvl: Verification failed: QE Identity issue date is in the future"),
        (1750320802, "dcap-qvl: Verification failed: TCBInfo issue date is in the future"),
        (
            1752919235,
            "dcap-qvl: Verification failed: Failed to verify certificate chain: CrlExpired "
            "{ time: UnixTime(1752919235), next_update: UnixTime(1752919235) }",
        ),
        (1752920164, "dcap-qvl: Verification failed: TCBInfo expired"),
    ],
)
def test_intel_sample_outside_window(now: int, reason: str) -> None:
    """Outside the window the verdict carries dcap-qvl's reason, flattened to one line."""
    quote, coll = intel_sample()
    v = verify_quote(quote, coll, Policy(), now)
    assert not v.ok and v.tcb_status is None
    assert v.reasons == [reason]


@pytest.mark.parametrize("bit", range(8))
def test_intel_sample_report_data_bit_flip(bit: int) -> None:
    """Flipping any bit of report_data's first byte breaks the ISV signature."""
    quote, coll = intel_sample()
    flipped = bytearray(quote)
    flipped[568] ^= 1 << bit
    v = verify_quote(bytes(flipped), coll, Policy(), NOW)
    assert v.reasons == ["dcap-qvl: Verification failed: ISV enclave report signature is invalid"]


def test_intel_root_explicit_equals_builtin() -> None:
    """Passing Intel's root DER explicitly gives the same verdict as the built-in anchor."""
    quote, coll = intel_sample()
    root = vector("dcap-qvl/TrustedRootCA.der")
    assert verify_quote(quote, coll, Policy(), NOW, root_ca_der=root).ok


def test_outdated_sample_quote_has_no_tcb_level() -> None:
    """The second sample quote is a negative vector: no matching TCB level."""
    v = verify_quote(
        vector("dcap-qvl/tdx_quote_outdated"), outdated_collateral(), Policy(), OUTDATED_NOW
    )
    assert v.reasons == ["dcap-qvl: Verification failed: No matching TCB level found"]


@pytest.mark.parametrize("now", [1771412331, OUTDATED_NOW, 1774003274])
def test_dstack_quote_report_verifies_with_outdated_collateral(now: int) -> None:
    """dstack's quote-report.json quote is UpToDate with the matching (FMSPC 90C06F) set."""
    v = verify_quote(dstack_quote(), outdated_collateral(), Policy(), now)
    assert (v.ok, v.tcb_status, v.advisory_ids) == (True, "UpToDate", [])
    report = json.loads(vector("dstack/quote-report.json"))
    assert v.quote is not None
    assert v.quote.report.report_data.hex() == report["report_data"]


def test_dstack_quote_report_crl_expired_after_window() -> None:
    """One second past the window the CRL has expired."""
    v = verify_quote(dstack_quote(), outdated_collateral(), Policy(), 1774003275)
    assert not v.ok and "CrlExpired" in v.reasons[0]


def test_dstack_quote_with_wrong_collateral() -> None:
    """With the Intel sample's collateral the dstack quote's PCK cert is not yet valid."""
    _, coll = intel_sample()
    v = verify_quote(dstack_quote(), coll, Policy(), NOW)
    assert len(v.reasons) == 1 and "CertNotValidYet" in v.reasons[0]


def test_dstack_quote_report_data_flip() -> None:
    """Flipping one bit of the dstack quote's report_data fails the ISV signature."""
    flipped = bytearray(dstack_quote())
    flipped[600] ^= 0x80
    v = verify_quote(bytes(flipped), outdated_collateral(), Policy(), OUTDATED_NOW)
    assert v.reasons == ["dcap-qvl: Verification failed: ISV enclave report signature is invalid"]


def test_dstack_quote_with_its_event_log_replays() -> None:
    """quote-report.json's event log replays to the quote's RTMRs inside verify_quote."""
    from pydstack.adapters.tdx.eventlog import parse_json_event_log

    report = json.loads(vector("dstack/quote-report.json"))
    log = parse_json_event_log(report["event_log"])
    v = verify_quote(dstack_quote(), outdated_collateral(), Policy(), OUTDATED_NOW, event_log=log)
    assert v.ok, v.reasons
    broken = [*log[:-1], log[-1].__class__(imr=3, event_type=1, digest=bytes(48))]
    v = verify_quote(
        dstack_quote(), outdated_collateral(), Policy(), OUTDATED_NOW, event_log=broken
    )
    assert not v.ok and any(r.startswith("RTMR3 mismatch") for r in v.reasons)


def test_dcap_qvl_agrees_on_the_vector_directly() -> None:
    """Sanity anchor: dcap-qvl alone agrees with our verdict on the Intel sample."""
    quote, coll = intel_sample()
    assert dcap_qvl.verify(quote, coll, NOW).status == "UpToDate"
