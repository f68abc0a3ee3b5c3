"""The parsers new with dstack v0.5.11 guests (issue 16 item 3), fed hostile bytes.

A client certificate's AppInfo extension (1.3.6.1.4.1.62397.1.9, rmp_serde of dstack's
`AppInfo`) and its stripped event log (RTMR3 events only, `into_stripped`) are bytes the
client chose. The AppInfo decoder is bounded and fails only with `AppInfoDecodeError`
(`RaTlsError` from a certificate); a stripped log is replayed to RTMR3 and refused when it
does not replay."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydstack.adapters.tdx.attestation import decode_attestation
from pydstack.adapters.tdx.collateral import collateral_from_json
from pydstack.adapters.tdx.identity import AppInfo
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.quote import parse_quote
from pydstack.adapters.tdx.ratls import (
    OID_APP_INFO,
    RaTlsError,
    _ext,
    app_info_of,
    build_ratls_cert,
    check_ratls_cert,
    ratls_report_data,
)
from pydstack.adapters.tdx.ratls_appinfo import (
    MAX_APP_INFO,
    AppInfoDecodeError,
    decode_app_info_ext,
    encode_app_info,
)
from pydstack.adapters.tdx.ratls_log import is_stripped, log_for_replay, stripped_log_reasons
from tests.gateway.simcvm import SimCvm
from tests.kms.dstack_guest import RCGEN_NOT_BEFORE, stripped

INFO = AppInfo(app_id=b"\xaa" * 20, compose_hash=b"\xbb" * 32, instance_id=b"\xcc" * 20,
               device_id=b"\xdd" * 32, mr_system=b"\x01" * 32, mr_aggregated=b"\x02" * 32,
               os_image_hash=b"\x03" * 32, key_provider_info=b'{"kms":1}')  # fmt: skip


def _bin(b: bytes) -> bytes:
    return b"\xc4" + bytes([len(b)]) + b  # msgpack bin 8 (every field here is < 256 bytes)


def test_app_info_is_encoded_as_rmp_serde_writes_v0_5_11s_struct() -> None:
    """rmp_serde's default for `AppInfo` (8 fields, v0.5.11): a fixarray of 8 `bin`s in field
    order; the bytes are built from the MessagePack spec, not from our encoder."""
    i = INFO
    fields = [i.app_id, i.compose_hash, i.instance_id, i.device_id,
              i.mr_system, i.mr_aggregated, i.os_image_hash, i.key_provider_info]  # fmt: skip
    want = b"\x98" + b"".join(_bin(f) for f in fields)
    assert encode_app_info(INFO) == want
    assert decode_app_info_ext(want) == INFO


def test_main_branchs_ninth_field_is_read_and_written_only_when_set() -> None:
    """dstack main's `init_script_hashes` (a ninth element) is decoded; we write it only when
    non-empty, so a v0.5.11 reader (which refuses nine) reads ours."""
    info = msgspec.structs.replace(INFO, init_script_hashes=(b"\x09" * 32,))
    raw = encode_app_info(info)
    assert raw[0] == 0x99 and decode_app_info_ext(raw) == info


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x97" + _bin(b"") * 7, "7 fields"),
        (b"\x98" + _bin(b"") * 8, "mr_system is 0 bytes"),
        (b"\x98" + b"\x01" + _bin(b"") * 7, "app_id is int"),
        (b"\xc1", "not MessagePack"),
        (b"\x98\xc5\x13\x88" + b"\x00" * 5000, f"over {MAX_APP_INFO}"),  # bin 16
        (b"\x99" + _bin(b"") * 4 + _bin(b"\x01" * 32) * 2 + _bin(b"") * 2 + b"\xc0", "init_script"),
    ],
)
def test_malformed_app_info_is_refused_with_its_reason(raw: bytes, why: str) -> None:
    with pytest.raises(AppInfoDecodeError, match=why):
        decode_app_info_ext(raw)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2 * MAX_APP_INFO))
def test_any_bytes_decode_to_an_app_info_or_its_error(raw: bytes) -> None:
    try:
        info = decode_app_info_ext(raw)
    except AppInfoDecodeError:
        return
    assert len(info.mr_system) == 32 and len(info.mr_aggregated) == 32


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_app_info_decodes_or_fails_cleanly(data: st.DataObject) -> None:
    raw = bytearray(encode_app_info(INFO))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        decode_app_info_ext(bytes(raw))
    except AppInfoDecodeError:
        pass


def _cert_with_app_info_ext(content: bytes) -> x509.Certificate:
    """A self-signed certificate whose 1.9 extension holds `content` as a DER OCTET STRING."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + dt.timedelta(minutes=1))
        .add_extension(_ext(OID_APP_INFO, content), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_a_certificates_app_info_extension_is_read_or_refused_as_ratls_error(raw: bytes) -> None:
    cert = _cert_with_app_info_ext(raw)
    try:
        app_info_of(cert)
    except RaTlsError:
        pass


@pytest.fixture(scope="module")
def pki() -> DevPki:
    return DevPki.generate()


def test_a_stripped_certificate_log_verifies_and_a_rewritten_one_does_not(pki: DevPki) -> None:
    """A v0.5.11-shaped RA-TLS certificate (stripped log, 1975 notBefore) checks out with the
    attested AppInfo; the same with the instance-id event's payload rewritten (log and
    runtime events alike) does not replay to RTMR3."""
    cvm = SimCvm(pki, b"\xaa" * 20, b"\x11" * 20, b"compose")
    key = ec.generate_private_key(ec.SECP256R1())
    att = stripped(asyncio.run(cvm.attest(ratls_report_data(key.public_key()))))
    coll = collateral_from_json(pki.collateral_json(int(time.time())))

    def check(a: object) -> tuple[bool, tuple[str, ...], bytes | None]:
        late = int(time.time()) + 60
        cert = build_ratls_cert(key, a, subject="RA-TLS TEMP Cert",  # type: ignore[arg-type]
                                not_before=RCGEN_NOT_BEFORE, not_after=late)  # fmt: skip
        r = check_ratls_cert(cert.public_bytes(serialization.Encoding.DER), coll,
                             now=int(time.time()), root_ca_der=pki.root_der)  # fmt: skip
        return r.ok, r.reasons, r.app_info.instance_id if r.app_info else None

    assert all(e.imr == 3 for e in att.event_log) and att.event_log
    assert check(att) == (True, (), b"\x11" * 20)
    log = tuple(msgspec.structs.replace(e, event_payload=b"\x66" * 20)
                if e.event == "instance-id" else e for e in att.event_log)  # fmt: skip
    rt = tuple(msgspec.structs.replace(e, payload=b"\x66" * 20)
               if e.event == "instance-id" else e for e in att.runtime_events)  # fmt: skip
    ok, reasons, _ = check(msgspec.structs.replace(att, event_log=log, runtime_events=rt))
    assert not ok and any("stripped certificate log" in r for r in reasons), reasons


def test_dstacks_own_attestation_stripped_as_ra_tls_does_replays_to_its_quotes_rtmr3() -> None:
    """dstack's guest-agent fixture (`tests/vectors/dstack/attestation.bin`, made by dstack's
    code), stripped by `into_stripped`'s rule: its 9 runtime events replay to the quote's
    RTMR3; with one payload changed they do not."""
    raw = (Path(__file__).parent.parent / "vectors" / "dstack" / "attestation.bin").read_bytes()
    att = stripped(decode_attestation(raw))
    rtmr3 = parse_quote(att.quote).report.rtmr3
    assert is_stripped(att.event_log) and len(att.event_log) == 9
    assert log_for_replay(att.event_log) is None
    assert stripped_log_reasons(att.event_log, rtmr3) == []
    bad = (msgspec.structs.replace(att.event_log[0], event_payload=b"x"), *att.event_log[1:])
    assert any("RTMR3 mismatch" in r for r in stripped_log_reasons(bad, rtmr3))
