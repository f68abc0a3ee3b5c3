"""Simulator quotes: accepted by dcap-qvl with the dev root only, and tamper-evident."""

from __future__ import annotations

import json
import stat

import dcap_qvl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydstack.adapters.tdx.collateral import collateral_from_json
from pydstack.adapters.tdx.errors import TdxError
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.quote import BODY_TD15, parse_quote
from pydstack.adapters.tdx.simulator import QuoteSimulator, TdMeasurements
from pydstack.adapters.tdx.verify import Policy, verify_quote

from .sim_support import NOW, dev_collateral, dev_pki, dev_sim

RTMRS = (bytes([1]) * 48, bytes([2]) * 48, bytes([3]) * 48, bytes([4]) * 48)
QUOTE = dev_sim().quote(b"report-data", TdMeasurements(rtmrs=RTMRS))
SIGNED_AND_SIG = 632 + 4 + 64 + 64  # header+body, auth length, ECDSA signature, attestation key


def test_dev_root_accepts_and_round_trips_measurements() -> None:
    """dcap-qvl with the dev root: UpToDate, and its report carries our RTMRs/report_data."""
    r = dcap_qvl.verify_with_root_ca(QUOTE, dev_collateral(), dev_pki().root_der, NOW)
    assert (r.status, r.advisory_ids) == ("UpToDate", [])
    td = json.loads(r.to_json())["report"]["TD10"]
    assert td["rt_mr2"] == RTMRS[2].hex()
    assert td["report_data"] == (b"report-data" + bytes(53)).hex()


def test_production_config_refuses_dev_quotes() -> None:
    """Without a configured root (Intel's anchor) a dev quote never verifies."""
    v = verify_quote(QUOTE, dev_collateral(), Policy(), NOW)
    assert v.reasons == [
        "dcap-qvl: Verification failed: Failed to parse root CA CRL: "
        "InvalidCrlSignatureForPublicKey"
    ]


def test_other_dev_root_refuses() -> None:
    """Another dev PKI's root does not verify this PKI's quotes."""
    other = DevPki.generate()
    v = verify_quote(QUOTE, dev_collateral(), Policy(), NOW, other.root_der)
    assert not v.ok and v.reasons[0].startswith("dcap-qvl: ")


@pytest.mark.parametrize(("version", "body"), [(5, 2), (5, BODY_TD15)])
def test_v5_quotes_verify(version: int, body: int) -> None:
    """v5 quotes (TD 1.0 and TD 1.5 bodies) verify with the dev root too."""
    q = dev_sim().quote(b"v5", version=version, body_type=body)
    v = verify_quote(q, dev_collateral(), Policy(report_data=b"v5"), NOW, dev_pki().root_der)
    assert v.ok, v.reasons
    assert v.quote is not None and v.quote.header.version == 5


def test_collateral_expires() -> None:
    """Collateral issued for NOW expires after its validity (30 days by default)."""
    v = verify_quote(QUOTE, dev_collateral(), Policy(), NOW + 31 * 86400, dev_pki().root_der)
    assert not v.ok and "CrlExpired" in v.reasons[0]


def test_pki_save_load_shares_root(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A saved PKI reloads with the same root; keys are 0600; a loaded simulator's quotes
    verify against the saved root.der."""
    pki = DevPki.generate()
    pki.save(tmp_path)
    for key in tmp_path.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    loaded = DevPki.load(tmp_path)
    root = (tmp_path / "root.der").read_bytes()
    assert root == pki.root_der == loaded.root_der
    coll = collateral_from_json(loaded.collateral_json(NOW))
    q = QuoteSimulator(loaded).quote(b"x")
    assert verify_quote(q, coll, Policy(), NOW, root).ok


def test_load_missing_pki_is_typed_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Loading from an empty directory raises TdxError naming the directory."""
    with pytest.raises(TdxError, match="cannot load dev PKI"):
        DevPki.load(tmp_path)


def test_bad_measurement_sizes_refused() -> None:
    """Wrong-sized measurements or over-long report_data are refused, not silently padded."""
    with pytest.raises(TdxError, match="rtmr1 must be 48 bytes"):
        dev_sim().quote(b"", TdMeasurements(rtmrs=(RTMRS[0], b"x", RTMRS[2], RTMRS[3])))
    with pytest.raises(TdxError, match="at most 64 bytes"):
        dev_sim().quote(bytes(65))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, SIGNED_AND_SIG - 1), st.integers(1, 255))
def test_any_byte_flip_in_signed_region_or_signature_fails(pos: int, xor: int) -> None:
    """Changing any byte of header, TD report, signature or attestation key is refused with
    at least one reason."""
    tampered = bytearray(QUOTE)
    tampered[pos] ^= xor
    v = verify_quote(bytes(tampered), dev_collateral(), Policy(), NOW, dev_pki().root_der)
    assert not v.ok and v.reasons


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 511))
def test_report_data_bit_flip_fails_signature(bit: int) -> None:
    """Every single-bit flip of report_data fails the ISV signature check."""
    tampered = bytearray(QUOTE)
    tampered[568 + bit // 8] ^= 1 << (bit % 8)
    v = verify_quote(bytes(tampered), dev_collateral(), Policy(), NOW, dev_pki().root_der)
    assert v.reasons == ["dcap-qvl: Verification failed: ISV enclave report signature is invalid"]


def test_quote_parses_with_simulator_chain() -> None:
    """The embedded PCK chain is leaf, platform CA, root — the dev PKI's own certificates."""
    chain = parse_quote(QUOTE).pck_chain_pem
    assert "".join(chain).encode() == dev_pki().pck_chain_pem.decode().encode()
