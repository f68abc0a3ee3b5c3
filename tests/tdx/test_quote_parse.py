"""Quote parsing: field layout on real vectors, v5 bodies, and only QuoteParseError on junk."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydstack.adapters.tdx.errors import QuoteParseError, TdxError
from pydstack.adapters.tdx.quote import BODY_TD10, BODY_TD15, parse_quote
from pydstack.adapters.tdx.simulator import TdMeasurements

from .sim_support import dev_sim, dstack_quote, vector

INTEL = vector("dcap-qvl/tdx_quote")


def test_intel_sample_header_and_body_fields() -> None:
    """The Intel sample parses to a v4 TDX quote whose fields sit at the documented offsets."""
    q = parse_quote(INTEL)
    assert (q.header.version, q.header.att_key_type, q.header.tee_type) == (4, 2, 0x81)
    assert q.header.qe_vendor_id.hex() == "939a7233f79c4ca9940a0db3957f0607"
    assert q.signed_len == 632 and q.body_type == BODY_TD10
    assert q.report.report_data == INTEL[568:632]
    assert q.report.rtmr3 == INTEL[520:568]
    assert q.report.mr_td == INTEL[48 + 136 : 48 + 184]
    assert q.report.tee_tcb_svn2 is None and q.report.mr_service_td is None
    assert not q.debug


def test_intel_sample_signature_data() -> None:
    """Signature data: QE report binds sha256(attestation key || auth data), PCK chain is PEM."""
    import hashlib

    q = parse_quote(INTEL)
    qe = q.signature.qe
    assert len(q.signature.ecdsa_signature) == 64 and len(q.signature.attestation_key) == 64
    assert qe.cert_type == 5 and len(qe.qe_auth_data) == 32
    bound = hashlib.sha256(q.signature.attestation_key + qe.qe_auth_data).digest()
    assert qe.qe_report.report_data[:32] == bound
    assert qe.qe_report.isv_prod_id == 2
    chain = q.pck_chain_pem
    assert len(chain) == 3 and all(c.startswith("-----BEGIN CERTIFICATE-----") for c in chain)


def test_attestation_vector_mrtd_and_config_id() -> None:
    """The dstack attestation vector's quote parses to its documented MRTD and RTMRs."""
    decoded = json.loads(vector("dstack/attestation.decoded.json"))
    q = parse_quote(bytes.fromhex(decoded["quote"]))
    assert q.report.mr_td.hex() == (
        "e53236d44a074bc78e784cdfa1a2c858a5f6b53afc1b60d8f079662314978b64"
        "241b646d8498dd767d5ea48e1e115822"
    )
    assert q.report.rtmr3.hex().startswith("f28a1490ee924e9396c2ccf2d93ad536")
    assert q.report.mr_config_id[:1] == b"\x01"
    assert q.report.mr_owner == bytes(48)


def test_dstack_quote_report_data() -> None:
    """quote-report.json's quote carries report_data 1234 followed by zeros."""
    q = parse_quote(dstack_quote())
    assert q.report.report_data == bytes.fromhex("1234") + bytes(62)


def test_debug_bit_from_td_attributes() -> None:
    """td_attributes bit 0 makes `debug` true."""
    m = TdMeasurements(td_attributes=bytes.fromhex("0100001000000000"))
    assert parse_quote(dev_sim().quote(b"", m)).debug
    assert not parse_quote(dev_sim().quote(b"")).debug


def test_v5_td10_from_simulator() -> None:
    """A v5 quote with a TD 1.0 body parses to the same report as its v4 twin."""
    v4 = parse_quote(dev_sim().quote(b"r"))
    v5 = parse_quote(dev_sim().quote(b"r", version=5))
    assert v5.header.version == 5 and v5.body_type == BODY_TD10
    assert v5.signed_len == 638  # header + 6-byte body descriptor + 584
    assert v5.report == v4.report


def test_v5_td15_fields() -> None:
    """A v5 TD 1.5 body adds tee_tcb_svn2 and mr_service_td after report_data."""
    svc = bytes(range(48))
    q = parse_quote(dev_sim().quote(b"r", version=5, body_type=BODY_TD15, mr_service_td=svc))
    assert q.body_type == BODY_TD15 and q.signed_len == 702
    assert q.report.mr_service_td == svc
    assert q.report.tee_tcb_svn2 == dev_sim().pki.params.tee_tcb_svn


def test_v5_rewrap_of_intel_v4_body() -> None:
    """Re-wrapping the Intel v4 body in a v5 descriptor (version 5, type 2, size 584) parses
    to the same report: v5 only inserts the descriptor before the body."""
    rewrapped = (
        (5).to_bytes(2, "little")
        + INTEL[2:48]
        + (2).to_bytes(2, "little")
        + (584).to_bytes(4, "little")
        + INTEL[48:]
    )
    assert parse_quote(rewrapped).report == parse_quote(INTEL).report


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (0, "truncated quote: header.version needs 2 bytes at offset 0, 0 left"),
        (10, "truncated quote: header.pce_svn needs 2 bytes at offset 10, 0 left"),
        (600, "truncated quote: td_report.report_data needs 64 bytes at offset 568, 32 left"),
        (700, "truncated quote: signature.data needs 4300 bytes at offset 636, 64 left"),
    ],
)
def test_truncation_messages_name_field_and_offset(cut: int, message: str) -> None:
    """A truncated quote names the field that did not fit, its offset and what was left."""
    with pytest.raises(QuoteParseError) as exc:
        parse_quote(INTEL[:cut])
    assert str(exc.value) == message


def test_wrong_version_and_tee_type() -> None:
    """Unsupported versions and SGX quotes are refused with the offending value."""
    with pytest.raises(QuoteParseError, match="unsupported quote version 3 at offset 0"):
        parse_quote((3).to_bytes(2, "little") + INTEL[2:])
    with pytest.raises(QuoteParseError, match="tee_type 0x0 at offset 4"):
        parse_quote(INTEL[:4] + bytes(4) + INTEL[8:])
    assert issubclass(QuoteParseError, TdxError)


def test_v5_bad_body_descriptor() -> None:
    """A v5 body type/size pair that does not match is refused."""
    bad = dev_sim().quote(b"", version=5)
    bad = bad[:50] + (600).to_bytes(4, "little") + bad[54:]
    with pytest.raises(QuoteParseError, match="v5 body size 600 at offset 50"):
        parse_quote(bad)


@settings(max_examples=300)
@given(st.binary(max_size=6000))
def test_random_bytes_raise_only_parse_error(data: bytes) -> None:
    """Random input either parses or raises QuoteParseError, never anything else."""
    try:
        parse_quote(data)
    except QuoteParseError:
        pass


@settings(max_examples=300)
@given(st.integers(0, len(INTEL) - 1), st.binary(min_size=1, max_size=8))
def test_mutated_intel_quote_raises_only_parse_error(pos: int, junk: bytes) -> None:
    """Overwriting bytes anywhere in a real quote never escapes as IndexError/struct.error."""
    data = INTEL[:pos] + junk + INTEL[pos + len(junk) :]
    try:
        parse_quote(data)
    except QuoteParseError:
        pass


def test_every_truncation_of_intel_quote_is_refused() -> None:
    """Every strict prefix of a real quote fails with QuoteParseError (length fields are
    checked), except prefixes that drop only the unused trailing bytes."""
    q = parse_quote(INTEL)
    end = q.signed_len + 4 + int.from_bytes(INTEL[q.signed_len : q.signed_len + 4], "little")
    for cut in range(end):
        with pytest.raises(QuoteParseError):
            parse_quote(INTEL[:cut])
