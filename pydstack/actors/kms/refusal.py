"""Refusals that leave nothing on the log: a metric and one log line each.

Any client may fetch the temp CA and present a certificate under it, so what such a client
sends is no evidence of anything until its attestation verified. A key request that is
malformed, over its size bounds, whose evidence does not verify (quote, binding, freshness,
event log replay), or whose check cannot run (collateral unavailable) is refused before
anything is appended: the permanent log holds only requests whose evidence verified, and
their decisions. Each refusal counts in ``pydstack_kms_refused_total{reason}`` (`reason`:
one of `KINDS`, never client text) and logs one ``kms request refused`` line, its reason
clipped to `MAX_REASON` characters (it may quote what the client sent).

    raise refuse("GetAppKey", OVERSIZE, "vm_config is 20000 bytes, over 16384", field="vm_config")
"""

from __future__ import annotations

from typing import Final

import structlog
from prometheus_client import Counter

from .evidence import BINDING, EVENT_LOG, MALFORMED, OVERSIZE, QUOTE, STALE

COLLATERAL_UNAVAILABLE = "collateral_unavailable"  # the check cannot run (PCCS down)
NO_CERTIFICATE = "no_certificate"  # a key method called without a client certificate
OTHER = "other"  # a kind this module does not know (a bug): still counted, never client text
# SignCert: another decision for this instance and usage inside its window (certgrants.py)
RATE_LIMITED = "rate_limited"
KINDS = frozenset({MALFORMED, OVERSIZE, QUOTE, BINDING, STALE, EVENT_LOG, COLLATERAL_UNAVAILABLE,
                   NO_CERTIFICATE, RATE_LIMITED, OTHER})  # fmt: skip
MAX_REASON = 1000

REFUSED: Final = Counter(
    "pydstack_kms_refused",
    "KMS key requests refused before anything was appended (malformed, oversized, evidence "
    "that does not verify, a check that cannot run), by kind.",
    ["reason"],
)
# HTTP status per kind; the rest is 403 (the evidence is refused; a malformed body is 400).
_STATUS = {OVERSIZE: 413, COLLATERAL_UNAVAILABLE: 503, NO_CERTIFICATE: 401, RATE_LIMITED: 429}

log = structlog.get_logger("pydstack.kms")


class Refused(Exception):
    """A key request refused with nothing on the log; `field` names a bad request field."""

    def __init__(self, kind: str, reason: str, *, field: str = "") -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.field = field

    @property
    def status(self) -> int:
        return _STATUS.get(self.kind, 403)


def refuse(method: str, kind: str, reason: str, *, field: str = "", **context: object) -> Refused:
    """Count and log a refusal; returns the exception to raise."""
    kind = kind if kind in KINDS else OTHER
    if len(reason) > MAX_REASON:
        reason = reason[:MAX_REASON] + f"... ({len(reason) - MAX_REASON} more characters)"
    REFUSED.labels(reason=kind).inc()
    log.warning("kms request refused", method=method, refused=kind, reason=reason, **context)
    return Refused(kind, reason, field=field)
