"""Shared test data for the quote/verify/backend tests: vector paths and one dev PKI."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pydstack.adapters.tdx.collateral import Collateral, collateral_from_json
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.simulator import QuoteSimulator

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
NOW = 1751000000  # inside the Intel sample's window; the dev collateral is issued for it too
OUTDATED_NOW = 1772000000  # inside tdx_quote_outdated_collateral.json's window


def vector(rel: str) -> bytes:
    return (VECTORS / rel).read_bytes()


def intel_sample() -> tuple[bytes, Collateral]:
    return (
        vector("dcap-qvl/tdx_quote"),
        collateral_from_json(vector("dcap-qvl/tdx_quote_collateral.json")),
    )


def dstack_quote() -> bytes:
    return bytes.fromhex(json.loads(vector("dstack/quote-report.json"))["quote"])


def outdated_collateral() -> Collateral:
    return collateral_from_json(vector("dcap-qvl/tdx_quote_outdated_collateral.json"))


@functools.cache
def dev_pki() -> DevPki:
    return DevPki.generate()


@functools.cache
def dev_sim() -> QuoteSimulator:
    return QuoteSimulator(dev_pki())


@functools.cache
def dev_collateral_json(tcb_status: str = "UpToDate", advisories: tuple[str, ...] = ()) -> str:
    return dev_pki().collateral_json(NOW, tcb_status=tcb_status, advisory_ids=advisories)


def dev_collateral(tcb_status: str = "UpToDate", advisories: tuple[str, ...] = ()) -> Collateral:
    return collateral_from_json(dev_collateral_json(tcb_status, advisories))
