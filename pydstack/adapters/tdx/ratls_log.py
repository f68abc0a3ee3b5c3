"""The event log inside a dstack v0.5.11 RA-TLS certificate: the stripped form.

dstack's ra-tls writes a certificate's attestation with `VersionedAttestation::into_stripped`
(`dstack-attest`): only the IMR 3 (runtime) events are kept, each without its digest (it
follows from name and payload). The boot-time events of RTMR0-2 are not there, so such a log
cannot be replayed against the quote's RTMR0-2; dstack's own verifier replays RTMR3 only
and takes RTMR0-2 (MRTD, mr_system, the image) from the signed quote, as every decision here
does too. A full log (what our guests and KMS write) is still replayed whole.

    verdict = verify_quote(att.quote, coll, policy, now, root, event_log=log_for_replay(log))
    reasons += stripped_log_reasons(log, quote.report.rtmr3)
"""

from __future__ import annotations

from collections.abc import Sequence

from .eventlog import EventLogError, TdxEvent, replay_rtmrs, runtime_digest_problems

RUNTIME_IMR = 3


def is_stripped(log: Sequence[TdxEvent]) -> bool:
    """Whether `log` is dstack's certificate form: no boot-time (RTMR0-2) event at all."""
    return all(e.imr == RUNTIME_IMR for e in log)


def log_for_replay(log: Sequence[TdxEvent]) -> Sequence[TdxEvent] | None:
    """The log to replay against RTMR0-3 (None for a stripped one: see `stripped_log_reasons`)."""
    return None if is_stripped(log) else log


def stripped_log_reasons(log: Sequence[TdxEvent], rtmr3: bytes) -> list[str]:
    """Why a stripped log does not replay to the quote's RTMR3 ([] for a full log, which
    `verify_quote` replays whole)."""
    if not is_stripped(log):
        return []
    try:
        replayed = replay_rtmrs(log)[RUNTIME_IMR]
    except EventLogError as e:
        return [f"event log: {e}"]
    reasons = runtime_digest_problems(log)
    if replayed != rtmr3:
        reasons.append(
            f"RTMR3 mismatch: quoted {rtmr3.hex()}, replayed {replayed.hex()} from "
            f"{len(log)} events (stripped certificate log)"
        )
    return reasons
