"""The pure decision core: which events a request produces, from evidence and a verdict."""

from __future__ import annotations

import msgspec

from pydstack.core.events import KeyDenied, KeyIssued
from pydstack.core.kms import AuthVerdict, KeyRequest, abandoned, decide, key_requested
from pydstack.core.kms.decision import ABANDONED, boot_info, quote_hash

APP = "ab" * 20
BOOT = boot_info(
    tcb_status="UpToDate", advisory_ids=[], app_id=bytes.fromhex(APP),
    compose_hash=b"\x01" * 32, instance_id=b"\x02" * 20, device_id=b"\x03" * 32,
    mr_system=b"\x04" * 32, mr_aggregated=b"\x05" * 32, os_image_hash=b"\x06" * 32,
)  # fmt: skip
REQ = KeyRequest(
    request_id="r1", method="GetAppKey", attestation=b"att", quote=b"quote", vm_config="{}",
    policy="{}", verified_at=7, kms_instance="kms-a", app_id=APP, instance_id="02" * 20,
)  # fmt: skip


def test_the_request_event_records_what_was_presented_and_no_verdict() -> None:
    ev = key_requested(REQ)
    assert (ev.request_id, ev.app_id, ev.instance_id) == ("r1", APP, "02" * 20)
    assert ev.quote_hash == quote_hash(b"quote") != ""
    assert (ev.attestation, ev.policy, ev.verified_at) == (b"att", "{}", 7)
    assert ev.kms_instance == "kms-a"


def test_allowed_evidence_and_verdict_issue_with_the_verified_boot_info() -> None:
    out = decide(REQ, reasons=[], boot=BOOT, verdict=AuthVerdict(True, "ok", "gw"), backend="b")
    assert isinstance(out, KeyIssued)
    assert out.boot_info == BOOT and out.gateway_app_id == "gw"
    assert out.verdict == "allowed: ok" and out.quote_hash == quote_hash(b"quote")
    assert out.tee == ""  # not said by the caller
    sim = decide(
        REQ, reasons=[], boot=BOOT, verdict=AuthVerdict(True), backend="b", tee="simulated"
    )
    assert isinstance(sim, KeyIssued) and sim.tee == "simulated"


def test_evidence_reasons_deny_even_when_a_verdict_says_allowed() -> None:
    out = decide(REQ, reasons=["debug TD refused"], boot=BOOT,
                 verdict=AuthVerdict(True, "ok"), backend="b")  # fmt: skip
    assert isinstance(out, KeyDenied)
    assert out.reason == "attestation refused: debug TD refused"


def test_a_backend_refusal_or_no_verdict_denies_naming_the_backend() -> None:
    no = decide(REQ, reasons=[], boot=BOOT, verdict=AuthVerdict(False, "hash"), backend="eth")
    assert isinstance(no, KeyDenied) and no.reason == "backend eth denied: hash"
    silent = decide(REQ, reasons=[], boot=BOOT, verdict=None, backend="eth")
    assert isinstance(silent, KeyDenied) and silent.reason.endswith("no reason given")


def test_missing_boot_info_or_a_short_app_id_is_refused_before_any_backend() -> None:
    none = decide(REQ, reasons=[], boot=None, verdict=AuthVerdict(True, ""), backend="b")
    assert isinstance(none, KeyDenied) and "no boot info" in none.reason
    short = msgspec.structs.replace(BOOT, app_id="ab" * 4)
    out = decide(REQ, reasons=[], boot=short, verdict=AuthVerdict(True, ""), backend="b")
    assert isinstance(out, KeyDenied) and "app_id must be 20 bytes, got 4" in out.reason


def test_an_abandoned_request_is_denied_with_its_quote_hash() -> None:
    out = abandoned(key_requested(REQ))
    assert out.request_id == "r1" and out.reason == ABANDONED
    assert out.quote_hash == quote_hash(b"quote")
