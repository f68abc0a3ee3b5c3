"""Intel TDX: quotes, verification through dcap-qvl, backends (configfs-tsm and simulator).

    from pydstack.adapters.tdx import Policy, load_collateral, verify_quote
    verdict = verify_quote(quote, load_collateral(path), Policy(mr_td=mrtd), now=now)

Event logs, RA-TLS and dstack identities live in their own modules (`eventlog`, `ratls`,
`identity`, `attestation`).
"""

from .attestation import Attestation, decode_attestation, encode_attestation
from .backend import RecordingBackend, SimulatorBackend, TdxBackend, simulated_boot_events
from .ccel import parse_ccel
from .collateral import (
    Collateral,
    cached_collateral,
    collateral_from_json,
    fetch_collateral,
    load_collateral,
)
from .configfs import ConfigfsBackend
from .errors import BackendError, CollateralError, QuoteParseError, TdxError
from .eventlog import (
    EventLogError,
    RuntimeEvent,
    TdxEvent,
    dump_json_event_log,
    parse_json_event_log,
    replay_and_compare,
)
from .identity import AppInfo, decode_app_info
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
from .ratls import build_ratls_cert, check_ratls_cert
from .ratls_tls import RaTlsVerifier
from .simulator import QuoteSimulator, TdMeasurements
from .verify import Policy, Verdict, verify_quote

__all__ = [
    "AppInfo",
    "Attestation",
    "BackendError",
    "Collateral",
    "CollateralError",
    "ConfigfsBackend",
    "DevPki",
    "EnclaveReport",
    "EventLogError",
    "PkiParams",
    "Policy",
    "QeCertification",
    "Quote",
    "QuoteHeader",
    "QuoteParseError",
    "QuoteSignature",
    "QuoteSimulator",
    "RaTlsVerifier",
    "RecordingBackend",
    "RuntimeEvent",
    "SimulatorBackend",
    "TdMeasurements",
    "TdReport",
    "TdxBackend",
    "TdxError",
    "TdxEvent",
    "Verdict",
    "build_ratls_cert",
    "cached_collateral",
    "check_ratls_cert",
    "collateral_from_json",
    "decode_app_info",
    "decode_attestation",
    "dump_json_event_log",
    "encode_attestation",
    "fetch_collateral",
    "load_collateral",
    "parse_ccel",
    "parse_json_event_log",
    "parse_quote",
    "replay_and_compare",
    "simulated_boot_events",
    "verify_quote",
]
