"""Intel TDX: quotes, verification through dcap-qvl, backends (configfs-tsm and simulator).

    from pydstack.adapters.tdx import Policy, load_collateral, verify_quote
    verdict = verify_quote(quote, load_collateral(path), Policy(mr_td=mrtd), now=now)

Event logs, RA-TLS and dstack identities live in their own modules (`eventlog`, `ratls`,
`identity`, `attestation`).
"""

from .backend import RecordingBackend, SimulatorBackend, TdxBackend, simulated_boot_events
from .collateral import (
    Collateral,
    cached_collateral,
    collateral_from_json,
    fetch_collateral,
    load_collateral,
)
from .configfs import ConfigfsBackend
from .errors import BackendError, CollateralError, QuoteParseError, TdxError
from .pki import DevPki, PkiParams
from .quote import (
    EnclaveReport,
    QeCertification,
    Quote,
    QuoteHeader,
    QuoteSignature,
    TdReport,
    parse_quote,
)
from .simulator import QuoteSimulator, TdMeasurements
from .verify import Policy, Verdict, verify_quote

__all__ = [
    "BackendError",
    "Collateral",
    "CollateralError",
    "ConfigfsBackend",
    "DevPki",
    "EnclaveReport",
    "PkiParams",
    "Policy",
    "QeCertification",
    "Quote",
    "QuoteHeader",
    "QuoteParseError",
    "QuoteSignature",
    "QuoteSimulator",
    "RecordingBackend",
    "SimulatorBackend",
    "TdMeasurements",
    "TdReport",
    "TdxBackend",
    "TdxError",
    "Verdict",
    "cached_collateral",
    "collateral_from_json",
    "fetch_collateral",
    "load_collateral",
    "parse_quote",
    "simulated_boot_events",
    "verify_quote",
]
