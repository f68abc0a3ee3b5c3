"""dstack's event-log vectors replay to their quotes and give the documented app identity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pydstack.adapters.tdx.attestation import (
    AttestationDecodeError,
    decode_attestation,
    encode_attestation,
)
from pydstack.adapters.tdx.ccel import parse_ccel, parse_ccel_with_header
from pydstack.adapters.tdx.eventlog import (
    DSTACK_RUNTIME_EVENT_TYPE,
    EventLogError,
    canonical_event_json_v2,
    dump_json_event_log,
    parse_json_event_log,
    replay_and_compare,
    runtime_event_digest,
    runtime_events_of,
)
from pydstack.adapters.tdx.identity import (
    decode_app_info,
    measurements_of,
    mr_config_id_v1,
)
from pydstack.adapters.tdx.quote import parse_quote

VECTORS = Path(__file__).parent.parent / "vectors" / "dstack"
ATT_RTMRS = [
    "6203948b7c12a0c2e14ed9b11170d7b85345870a304bb0959d6c198224ce621fe944e4623af9631cd64eeffdc0d7fa94",
    "0ea1ad399114c5909c52c8b8c073f0c4e076b691495ca7d41f88c5bba6859e3911973ec95adce1503eb43f4670a2c306",
    "1c9854088a35a1c44483d6ba5e88333cf6a7f5b5ec26713f722c80dfc2d2b337346d7fb52452eacda0a8a8fb6fd306f1",
    "f28a1490ee924e9396c2ccf2d93ad536b83cbe159a1d45024d1fd7acdcc102145efcfcd0cfa209416446c70226affadf",
]
QR_RTMRS = [
    "2e3843265f8ecdd4e2282694747f6f2f111605c33f2a8882f5734ee6f3a6ce63d8f34aeef06093dcda76fa5f9d33d8d6",
    "a1b79d76021970f57c45c4a7c395f780bab37011a4df27fe44e8559bd1abb4d6e52f12f866d1d08405448eb797a5970f",
    "1e31b59d605df7ee8160cf7966be9bafa6d0e1905de7e09695a24cd9748e71a603a51fae1297619fa0c30517addbcd07",
    "0f787c3877f3e95095d5a4d13dd0fe0233803b30120d8469866719dc28f519ce021fe1e53459121e7a5a4443147185a8",
]


def test_attestation_bin_replays_to_documented_rtmrs() -> None:
    """attestation.bin decodes fully and its 33 events replay to the quote's four RTMRs."""
    att = decode_attestation((VECTORS / "attestation.bin").read_bytes())
    assert (len(att.quote), len(att.event_log), len(att.runtime_events)) == (5010, 33, 9)
    quote = parse_quote(att.quote)
    report = replay_and_compare(att.event_log, quote.report.rtmrs)
    assert report.ok, report.reasons
    assert [r.hex() for r in report.replayed] == ATT_RTMRS
    assert att.report_data == quote.report.report_data == bytes(64)
    assert runtime_events_of(att.event_log) == list(att.runtime_events)


def test_attestation_bin_round_trips_byte_for_byte() -> None:
    """Our SCALE encoder reproduces dstack's bytes exactly."""
    raw = (VECTORS / "attestation.bin").read_bytes()
    assert encode_attestation(decode_attestation(raw)) == raw


def test_attestation_bin_app_identity() -> None:
    """App identity from attestation.bin matches the documented event payloads and mr_config_id."""
    att = decode_attestation((VECTORS / "attestation.bin").read_bytes())
    report = parse_quote(att.quote).report
    info = decode_app_info(measurements_of(report), att.runtime_events, config=att.config)
    assert info.app_id.hex() == "5bb4ff9a3837357f19dc176407a5709c62eb6c56"
    assert info.compose_hash.hex() == (
        "c143116fef3940e7f776bfc0919c256232ae5338a6e948c96b711e0b2383483a"
    )
    assert info.instance_id.hex() == "1691ed1b47506cad7d08834668691d88246f5b1f"
    assert info.os_image_hash.hex() == (
        "e61be43dd1cc6a6f5edefd7c51b608983780839b0000ce60dd99737dcffe09b9"
    )
    assert json.loads(info.key_provider_info)["name"] == "kms"
    assert info.device_id == hashlib.sha256(b"").digest()  # unverified: no PPID, like dstack
    assert mr_config_id_v1(info.compose_hash) == report.mr_config_id
    # mr_system / mr_aggregated per dstack's formula, spelled out independently here.
    kp = hashlib.sha256(info.key_provider_info).digest()
    assert (
        info.mr_system
        == hashlib.sha256(report.mr_td + report.rtmr0 + report.rtmr1 + report.rtmr2 + kp).digest()
    )
    agg = hashlib.sha256(
        report.mr_td
        + report.rtmr0
        + report.rtmr1
        + report.rtmr2
        + report.rtmr3
        + report.mr_config_id
        + report.mr_owner
        + report.mr_owner_config
    ).digest()
    assert info.mr_aggregated == agg


def test_quote_report_json_replays_and_round_trips() -> None:
    """quote-report.json's 28-event JSON log replays to its quote and re-serializes identically."""
    doc = json.loads((VECTORS / "quote-report.json").read_text())
    events = parse_json_event_log(doc["event_log"])
    assert len(events) == 28
    quote = parse_quote(bytes.fromhex(doc["quote"]))
    report = replay_and_compare(events, quote.report.rtmrs)
    assert report.ok and [r.hex() for r in report.replayed] == QR_RTMRS
    runtime = [e for e in events if e.event_type == DSTACK_RUNTIME_EVENT_TYPE]
    assert len(runtime) == 8
    assert all(e.digest == runtime_event_digest(e.event, e.event_payload) for e in runtime)
    assert json.loads(dump_json_event_log(events)) == json.loads(doc["event_log"])
    info = decode_app_info(
        measurements_of(quote.report), runtime_events_of(events), config=doc["vm_config"]
    )
    assert info.os_image_hash.hex().startswith("14ad42d0")


def test_ccel_matches_dstack_snapshot() -> None:
    """ccel.bin parses like dstack's cc-eventlog snapshot (first digests, ACPI labels)."""
    header, events = parse_ccel_with_header((VECTORS / "ccel.bin").read_bytes())
    assert header.digest_sizes == {0x000C: 48}
    assert len(events) == 18
    assert events[0].digest.hex().startswith("2b630fa1d8fa9b6e8c6507d2256803ed")
    assert events[0].event_type == 0x8000000B
    assert events[1].digest.hex().startswith("344bc51c980ba621aaa00da3ed7436f7")
    assert [e.event for e in events if e.event] == ["acpi-loader", "acpi-rsdp", "acpi-tables"]
    assert all(e.imr in (0, 1) and len(e.digest) == 48 for e in events)


def test_v2_canonical_json_matches_dstack() -> None:
    """Event-log v2 digest input is dstack's JCS JSON (from its unit tests)."""
    assert canonical_event_json_v2("compose-hash", b"\xab\xcd") == (
        b'{"name":"compose-hash","payload":"abcd","type":134217729}'
    )
    assert canonical_event_json_v2('event"with\\special\nchars', b"\xff") == (
        b'{"name":"event\\"with\\\\special\\nchars","payload":"ff","type":134217729}'
    )


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"not json",
        b'[{"imr": 0}]',
        b'[{"imr": 0, "event_type": 1, "digest": "zz"}]',
        b'[{"imr": -1, "event_type": 1}]',
        b'[{"imr": 0, "event_type": 1, "version": 9}]',
    ],
)
def test_json_log_errors_are_typed(bad: bytes) -> None:
    """Malformed JSON logs raise EventLogError."""
    with pytest.raises(EventLogError):
        parse_json_event_log(bad)


def test_trailing_bytes_and_wrong_variant_refused() -> None:
    """A SCALE attestation with trailing bytes or another platform's variant is refused."""
    raw = (VECTORS / "attestation.bin").read_bytes()
    with pytest.raises(AttestationDecodeError, match="trailing"):
        decode_attestation(raw + b"\x00")
    with pytest.raises(AttestationDecodeError, match="variant"):
        decode_attestation(b"\x00\x01" + raw[2:])
    with pytest.raises(EventLogError):
        parse_ccel(b"\x00" * 64)
