"""The ``log`` authorization backend's decision: the app's own history on the log. Pure.

An app may get its keys for a compose hash exactly when one of its ``AppRegistered`` /
``AppUpgraded`` events (allowed by the write policy: the app's owner or an admin) names it.
The history only grows (every version ever allowed stays on the log, auditable); the owner
shrinks the allowed set by withdrawing one version (``AppComposeRevoked``, until a later
registration or upgrade names it again) or all of them (``AppRemoved``; a later
``AppRegistered`` starts again).
A VM created under an app id adds nothing: only app events count. Usage::

    allowed = allowed_composes(admitted_app_events)      # {compose hash hex, ...}
    verdict = decide_log_auth(boot, allowed)
"""

from __future__ import annotations

from collections.abc import Iterable

from pydstack.core.events import AppComposeRevoked, AppRegistered, AppRemoved, AppUpgraded
from pydstack.core.events.kms import BootInfo

from .auth import AuthVerdict

LOG_NOT_FOR_KMS = (
    "the log backend authorizes apps only, never a KMS: a replica needs the source's "
    "onboarding token (--kms-onboard-token-file) or its measurement allow-listed "
    "(--kms-allow-mr)"
)


def allowed_composes(events: Iterable[object]) -> frozenset[str]:
    """The compose hashes (lower-case hex) one app's admitted events allow, in log order."""
    allowed: set[str] = set()
    for e in events:
        match e:
            case AppRegistered() | AppUpgraded():
                allowed.add(e.compose_hash.lower().removeprefix("0x"))
            case AppComposeRevoked():  # the owner withdrew this version
                allowed.discard(e.compose_hash.lower().removeprefix("0x"))
            case AppRemoved():
                allowed.clear()
            case _:
                pass
    return frozenset(allowed)


def decide_log_auth(
    boot: BootInfo, allowed: frozenset[str], gateway_app_id: str = ""
) -> AuthVerdict:
    """Allow ``boot`` when its attested compose hash is one its app's history allows."""
    app, compose = boot.app_id.lower(), boot.compose_hash.lower()
    if not allowed:
        return AuthVerdict(False, f"log: app {app} is not registered (or removed) on the log")
    if compose not in allowed:
        return AuthVerdict(
            False,
            f"log: compose hash {compose} is not one app {app} registered or upgraded to "
            f"({len(allowed)} allowed)",
        )
    return AuthVerdict(True, f"log: compose hash {compose[:16]} registered for app {app}",
                       gateway_app_id)  # fmt: skip
