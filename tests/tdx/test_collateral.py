"""Collateral from files and from a PCCS over HTTP (the dev PCCS on loopback), with cache."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from pydstack.adapters.tdx.collateral import (
    cached_collateral,
    collateral_from_json,
    fetch_collateral,
    load_collateral,
)
from pydstack.adapters.tdx.devpccs import devpccs_app
from pydstack.adapters.tdx.errors import CollateralError, QuoteParseError
from pydstack.adapters.tdx.verify import Policy, verify_quote

from .sim_support import NOW, VECTORS, dev_pki, dev_sim


@pytest.fixture
async def pccs_url() -> AsyncIterator[str]:
    runner = web.AppRunner(devpccs_app(dev_pki(), now=lambda: NOW))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def test_load_collateral_file() -> None:
    """A collateral JSON file loads into dcap-qvl's type with its fields intact."""
    coll = load_collateral(VECTORS / "dcap-qvl/tdx_quote_collateral.json")
    assert '"fmspc":"B0C06F000000"' in coll.tcb_info


def test_missing_file_and_bad_json_are_typed(tmp_path: Path) -> None:
    """A missing file and malformed JSON raise CollateralError with the cause."""
    with pytest.raises(CollateralError, match="cannot read collateral file"):
        load_collateral(tmp_path / "nope.json")
    with pytest.raises(CollateralError, match="invalid collateral JSON"):
        collateral_from_json('{"tcb_info": 1}')


async def test_fetch_from_pccs_verifies_and_caches(pccs_url: str, tmp_path: Path) -> None:
    """dcap-qvl's PCCS client fetches the dev collateral over HTTP; the result verifies and is
    cached for offline use."""
    quote = dev_sim().quote(b"pccs")
    assert cached_collateral(tmp_path, quote) is None
    coll = await fetch_collateral(pccs_url, quote, cache_dir=tmp_path)
    assert verify_quote(quote, coll, Policy(), NOW, dev_pki().root_der).ok
    cached = cached_collateral(tmp_path, quote)
    assert cached is not None
    assert verify_quote(quote, cached, Policy(), NOW, dev_pki().root_der).ok


async def test_fetch_unknown_platform_fails_with_reason(pccs_url: str) -> None:
    """A quote from another platform (unknown FMSPC) gets a CollateralError naming the URL."""
    from pydstack.adapters.tdx.pki import DevPki, PkiParams
    from pydstack.adapters.tdx.simulator import QuoteSimulator

    other = QuoteSimulator(DevPki.generate(PkiParams(fmspc=bytes.fromhex("112233445566"))))
    with pytest.raises(CollateralError, match=r"cannot fetch collateral from http://127\.0\.0\.1"):
        await fetch_collateral(pccs_url, other.quote(b""))


async def test_fetch_garbage_quote_is_parse_error(pccs_url: str) -> None:
    """Garbage is refused before any network request."""
    with pytest.raises(QuoteParseError):
        await fetch_collateral(pccs_url, b"garbage")
