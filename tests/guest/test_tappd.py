"""The legacy tappd API on tappd.sock, driven by the SDK's deprecated TappdClient."""

from __future__ import annotations

import hashlib
import warnings

from cryptography import x509
from dstack_sdk import AsyncTappdClient

from pydstack.adapters.tdx.eventlog import parse_json_event_log
from pydstack.adapters.tdx.quote import parse_quote
from pydstack.adapters.tdx.verify import Policy, verify_quote

from .conftest import APP_ID, Guest


async def test_tappd_quote_derive_and_info(guest: Guest) -> None:
    """TdxQuote hashes with the app-data prefix, raw pads, DeriveKey is per path, Info works."""
    warnings.simplefilter("ignore", DeprecationWarning)
    async with AsyncTappdClient(guest.tappd_sock) as c:
        hashed = await c.tdx_quote(b"hello", "sha256")
        raw = await c.tdx_quote(b"\x01\x02", "raw")
        k1 = await c.derive_key("/a", "a.local")
        k1b = await c.derive_key("/a", "a.local")
        k2 = await c.derive_key("/b", "b.local")
        info = await c.info()
    report = parse_quote(hashed.decode_quote()).report
    assert report.report_data == hashlib.sha256(b"app-data:hello").digest().ljust(64, b"\x00")
    # The SDK left-pads raw hex to 64 bytes (zfill), so the data ends the report_data.
    assert parse_quote(raw.decode_quote()).report.report_data == bytes(62) + b"\x01\x02"
    verdict = verify_quote(
        hashed.decode_quote(),
        guest.collateral,
        Policy(),
        guest.now,
        guest.pki.root_der,
        event_log=parse_json_event_log(hashed.event_log),
    )
    assert verdict.ok, verdict.reasons
    assert k1.key == k1b.key and k1.key != k2.key  # derived from the app key and the path
    leaf = x509.load_pem_x509_certificate(k1.certificate_chain[0].encode())
    assert leaf.subject.rfc4514_string() == "CN=a.local"
    assert info.app_id == APP_ID.hex()
