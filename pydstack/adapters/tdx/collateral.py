"""Quote collateral (CRLs, TCB info, QE identity): from a JSON file, a cache, or a PCCS.

Collateral is dcap-qvl's `QuoteCollateralV3`; we never re-check its signatures ourselves.
The PCCS path uses dcap-qvl's own client (`get_collateral`), which speaks the Intel PCS v4 API
that both Intel's PCS and a PCCS serve; `devpccs` serves the simulator's collateral the same
way, so the network path is tested offline.

    coll = load_collateral("tests/vectors/dcap-qvl/tdx_quote_collateral.json")
    coll = await fetch_collateral("https://pccs.phala.network", quote, cache_dir=cache)
    source = CollateralCache.pccs("https://pccs.phala.network")   # what a verifier holds
    coll = await source(quote)          # one PCCS fetch per platform and TTL
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dcap_qvl

from .errors import CollateralError
from .quote import parse_quote

INTEL_PCS = "https://api.trustedservices.intel.com/tdx/certification/v4"
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
    return Path(cache_dir) / f"collateral-{platform_of(quote)}.json"


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


def platform_of(quote: bytes) -> str:
    """The collateral a quote needs depends on its platform (FMSPC) and PCK CA only."""
    try:
        q = dcap_qvl.parse_quote(quote)
        return f"{q.fmspc()}-{q.ca()}"
    except ValueError as e:
        raise CollateralError(f"cannot derive FMSPC/CA from quote: {flatten_error(str(e))}") from e


@dataclass(slots=True)
class _Entry:
    at: float  # when the fetch started, then when it settled
    fut: asyncio.Future[Collateral]


class CollateralCache:
    """Collateral for a quote, kept per platform (FMSPC + PCK CA): what every verifier that
    faces the network holds (the KMS, the gateway's RegisterCvm), so a request costs no PCCS
    round trip and a flood of requests from one platform costs one fetch.

    - An answer is reused for `ttl` seconds; concurrent requests for a platform share one
      fetch. Only collateral is reused, never a verdict: each quote is still verified in full,
      at its own `now`, against it (an expired CRL or TCB info shows as a refusal reason).
    - A failed fetch is remembered for `negative_ttl` seconds: meanwhile requests from that
      platform fail at once with a `CollateralError` saying so, without reaching the PCCS.
    - At most `max_platforms` platforms are kept (least recently used dropped first); an
      unparsable quote is refused before any fetch and never kept.

        source = CollateralCache.pccs(url)          # or CollateralCache(async_fetch_fn)
        coll = await source(quote)
    """

    def __init__(
        self,
        fetch: Callable[[bytes], Awaitable[Collateral]],
        *,
        ttl: float = 600.0,
        negative_ttl: float = 10.0,
        max_platforms: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch_fn = fetch
        self.ttl, self.negative_ttl, self.max_platforms = ttl, negative_ttl, max_platforms
        self.clock = clock
        self.fetches = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    @classmethod
    def pccs(cls, pccs_url: str, **kw: Any) -> CollateralCache:
        """Fetch from a PCCS / Intel PCS (`fetch_collateral`)."""
        return cls(lambda quote: fetch_collateral(pccs_url, quote), **kw)

    def __len__(self) -> int:
        return len(self._entries)

    async def __call__(self, quote: bytes) -> Collateral:
        key = platform_of(quote)
        now = self.clock()
        hit = self._entries.get(key)
        if hit is not None and (not hit.fut.done() or self._fresh(hit, now)):
            self._entries.move_to_end(key)
            if hit.fut.done() and hit.fut.exception() is not None:
                raise CollateralError(
                    f"{hit.fut.exception()} (remembered: the fetch for platform {key} failed "
                    f"{now - hit.at:.0f} s ago, retried {self.negative_ttl:g} s after)"
                )
            return await asyncio.shield(hit.fut)
        entry = _Entry(now, asyncio.ensure_future(self._fetch(quote)))
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_platforms:
            self._entries.popitem(last=False)
        entry.fut.add_done_callback(lambda _f: self._settled(key, entry))
        return await asyncio.shield(entry.fut)

    def _fresh(self, entry: _Entry, now: float) -> bool:
        if entry.fut.cancelled():
            return False
        failed = entry.fut.exception() is not None
        return now - entry.at < (self.negative_ttl if failed else self.ttl)

    async def _fetch(self, quote: bytes) -> Collateral:
        self.fetches += 1
        return await self._fetch_fn(quote)

    def _settled(self, key: str, entry: _Entry) -> None:
        entry.at = self.clock()  # both TTLs count from the answer
        if entry.fut.cancelled() and self._entries.get(key) is entry:
            del self._entries[key]  # a fetch cut short by shutdown is no answer


def flatten_error(text: str) -> str:
    """Flatten anyhow's multi-line 'X\\n\\nCaused by:\\n    Y' into 'X: Y'."""
    lines = [_CAUSE_INDEX.sub("", ln.strip()) for ln in text.splitlines()]
    return ": ".join(ln for ln in lines if ln and ln != "Caused by:")
