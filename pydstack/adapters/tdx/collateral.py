"""Quote collateral (CRLs, TCB info, QE identity): from a JSON file, a cache, or a PCCS.

Collateral is dcap-qvl's `QuoteCollateralV3`; we never re-check its signatures ourselves.
The PCCS path uses dcap-qvl's own client (`get_collateral`), which speaks the Intel PCS v4 API
that both Intel's PCS and a PCCS serve; `devpccs` serves the simulator's collateral the same
way, so the network path is tested offline.

    coll = load_collateral("tests/vectors/dcap-qvl/tdx_quote_collateral.json")
    coll = await fetch_collateral("https://pccs.phala.network", quote, cache_dir=cache)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import dcap_qvl

from .errors import CollateralError
from .quote import parse_quote

_CAUSE_INDEX = re.compile(r"^\d+: ")  # anyhow numbers causes when there are several

# dcap-qvl ships no py.typed; this alias documents what flows through our API.
Collateral = Any


def collateral_from_json(text: str | bytes) -> Collateral:
    """Parse collateral JSON (hex CRLs and signatures, as `QuoteCollateralV3.to_json` writes)."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as e:
            raise CollateralError(f"collateral is not UTF-8 JSON: {e}") from e
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(text)
    except ValueError as e:
        raise CollateralError(f"invalid collateral JSON: {flatten_error(str(e))}") from e


def load_collateral(path: str | os.PathLike[str]) -> Collateral:
    """Read a collateral JSON file (for offline verification and audits)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CollateralError(f"cannot read collateral file {path}: {e.strerror}") from e
    return collateral_from_json(data)


def _cache_path(cache_dir: str | os.PathLike[str], quote: bytes) -> Path:
    # Collateral depends on the platform (FMSPC) and the issuing CA of the PCK leaf.
    try:
        q = dcap_qvl.parse_quote(quote)
        key = f"{q.fmspc()}-{q.ca()}"
    except ValueError as e:
        raise CollateralError(f"cannot derive FMSPC/CA from quote: {flatten_error(str(e))}") from e
    return Path(cache_dir) / f"collateral-{key}.json"


def cached_collateral(cache_dir: str | os.PathLike[str], quote: bytes) -> Collateral | None:
    """Collateral cached by `fetch_collateral` for this quote's platform, or None."""
    path = _cache_path(cache_dir, quote)
    return load_collateral(path) if path.exists() else None


async def fetch_collateral(
    pccs_url: str, quote: bytes, *, cache_dir: str | os.PathLike[str] | None = None
) -> Collateral:
    """Fetch collateral for `quote` from a PCCS/PCS; with `cache_dir`, store it for offline use.

    The cache is only written, never trusted blindly: verification at `now` still checks every
    issue/next-update date, so a stale cache shows up as a verification reason.
    """
    parse_quote(quote)  # fail early with our own error on garbage
    try:
        coll = await dcap_qvl.get_collateral(pccs_url, quote)
    except (ValueError, RuntimeError) as e:
        raise CollateralError(
            f"cannot fetch collateral from {pccs_url}: {flatten_error(str(e))}"
        ) from e
    if cache_dir is not None:
        path = _cache_path(cache_dir, quote)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(coll.to_json())
        tmp.replace(path)  # atomic: a reader never sees half a file
    return coll


def flatten_error(text: str) -> str:
    """Flatten anyhow's multi-line 'X\\n\\nCaused by:\\n    Y' into 'X: Y'."""
    lines = [_CAUSE_INDEX.sub("", ln.strip()) for ln in text.splitlines()]
    return ": ".join(ln for ln in lines if ln and ln != "Caused by:")
