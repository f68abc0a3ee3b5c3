"""Who may hold the cluster's root keys: this KMS itself, a replica asking for them, and the
source a replica takes them from.

- **Itself** (`authorize_self`, dstack's `ensure_self_kms_allowed`): before serving, the KMS
  attests itself, verifies its own evidence and asks its backend `bootAuth/kms` about that
  BootInfo; a refusal, or a backend that cannot answer, stops the start (`SelfRefused`). The
  dev backend allows itself without asking anyone, and says so loudly.
- **A replica** (`GetKmsKey`, `KmsAuthority.authorize_replica`): a webhook / contract backend
  decides (`bootAuth/kms`); the dev backend authorizes apps only, so with it the replica needs
  an explicit authorization (`pydstack.core.kms.onboarding`): this KMS's onboarding token, or
  an allow-listed measurement.
- **The source** (`authorize_source`, on the replica): the backend decides; with dev the
  source proves it is the cluster's KMS by what onboarding checks anyway (its certificate
  chains to the CA on the log, the keys it returns match KmsRootCreated) and, when an
  allow-list is given, its measurement must be on it too.

    authority = KmsAuthority.create(token_file=data / "kms" / "onboard-token", allow_mrs=[mr])
    verdict, how = await authority.authorize_replica(backend, boot, quote, token)
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path

import structlog

from pydstack.adapters.secretfile import read_secret, write_secret
from pydstack.adapters.tdx.quote import parse_quote
from pydstack.adapters.tdx.ratls import Attester
from pydstack.adapters.tdx.verify import Policy
from pydstack.core.kms import (
    AuthBackend,
    AuthVerdict,
    BootInfo,
    OnboardingPolicy,
    backend_failure,
    explicit_verdict,
    parse_measurement,
    token_digest,
)
from pydstack.core.kms.onboarding import allowed_measurement

from .bootview import with_key_provider
from .evidence import CollateralSource, check_attestation

log = structlog.get_logger("pydstack.kms")
DEV = "dev"
# Backends that authorize apps only (dev: every attested app; log: what the app's events on
# the log allow): a KMS is authorized explicitly (token, allow-listed measurement) with them.
APPS_ONLY = frozenset({DEV, "log"})
SELF_REPORT_DATA = bytes(64)  # what dstack's KMS quotes about itself (no key to bind)


class SelfRefused(Exception):
    """This KMS may not serve: its backend refused it, or it cannot attest itself."""


class KmsAuthority:
    def __init__(self, policy: OnboardingPolicy | None = None, token_file: Path | None = None):
        self.policy = policy or OnboardingPolicy()
        self.token_file = token_file  # where this KMS's onboarding token is (for `up` to show)

    @classmethod
    def create(cls, *, token_file: str = "", allow_mrs: Sequence[str] = ()) -> KmsAuthority:
        """The authorizations this KMS accepts for replicas under the dev backend: the token in
        `token_file` (made, 0600, when missing) and the allow-listed measurements. ValueError
        names a bad measurement; SecretFileError a token file others can read."""
        mrs = frozenset(parse_measurement(m) for m in allow_mrs)
        digest, path = b"", None
        if token_file:
            path = Path(token_file)
            if not path.exists():
                try:
                    write_secret(path, secrets.token_urlsafe(32) + "\n", overwrite=False)
                except FileExistsError:
                    pass  # another start made it first: read that one
            digest = token_digest(read_token(path))
        return cls(OnboardingPolicy(token_sha256=digest, allowed_mrs=mrs), path)

    async def authorize_replica(
        self, backend: AuthBackend, boot: BootInfo, quote: bytes, token: str
    ) -> tuple[AuthVerdict, str]:
        """May the replica of verified `boot` (its `quote`) get the root keys? (verdict, what
        allowed it: "token", "mr_td:<hex>"…, "backend:<name>")."""
        if backend.name not in APPS_ONLY:
            return await _ask_kms(backend, boot), f"backend:{backend.name}"
        return explicit_verdict(self.policy, boot, parse_quote(quote).report.mr_td, token)

    async def authorize_source(
        self, backend: AuthBackend, boot: BootInfo, quote: bytes
    ) -> tuple[AuthVerdict, str]:
        """May a replica take the root keys from the source KMS of verified `boot`?"""
        if backend.name not in APPS_ONLY:
            return await _ask_kms(backend, boot), f"backend:{backend.name}"
        if not self.policy.allowed_mrs:
            return AuthVerdict(True, "holds the cluster's root (dev: no allow-list)"), "root"
        measured = allowed_measurement(self.policy, boot, parse_quote(quote).report.mr_td)
        if measured:
            return AuthVerdict(True, f"allow-listed measurement {measured}"), measured
        return AuthVerdict(False, "the source KMS's measurements are not on --kms-allow-mr"), ""


def read_token(path: str | Path) -> str:
    """An onboarding token from its 0600 file (SecretFileError when others can read it)."""
    token = read_secret(path).decode("utf-8", "replace").strip()
    if not token:
        raise ValueError(f"{path} holds no onboarding token")
    return token


async def _ask_kms(backend: AuthBackend, boot: BootInfo) -> AuthVerdict:
    try:
        return await backend.authorize_kms(boot)
    except Exception as e:  # a broken backend refuses; it never allows
        return backend_failure(backend.name, f"{type(e).__name__}: {e}")


async def authorize_self(
    backend: AuthBackend,
    attester: Attester | None,
    collateral: CollateralSource,
    *,
    policy: Policy,
    root_ca_der: bytes | None,
    now: int,
) -> AuthVerdict:
    """Ask `backend` about this KMS's own verified boot before it serves (`SelfRefused` when it
    may not). The dev backend allows itself unasked, loudly."""
    if backend.name == DEV:
        log.warning(
            "KMS SELF-AUTHORIZATION IS DEV: this KMS authorizes itself without asking anyone "
            "(and every attested app gets its keys). Not for production.",
            backend=DEV,
        )
        return AuthVerdict(True, "dev backend: self-authorized, unchecked")
    if backend.name in APPS_ONLY:
        log.info("kms self-authorization: the log backend authorizes apps only; this KMS "
                 "serves the root its key file holds", backend=backend.name)  # fmt: skip
        return AuthVerdict(True, f"{backend.name} backend: apps only, self not asked")
    if attester is None:
        raise SelfRefused(
            f"KMS self-authorization: backend {backend.name} must be asked about this KMS, "
            "which has no attestation source (give --dev-pki with --seal-appkeys, or run it "
            "in a CVM)"
        )
    try:
        att = await attester.attest(SELF_REPORT_DATA)
        coll = await collateral(att.quote)
    except Exception as e:
        raise SelfRefused(f"KMS self-authorization: cannot attest this KMS: {e}") from None
    # dstack's `local_kms_boot_info`: the whole view, its key provider included
    ev = with_key_provider(
        check_attestation(att, coll, policy=policy, now=now, root_ca_der=root_ca_der)
    )
    if ev.unverified or ev.boot is None:
        why = "; ".join(ev.unverified or ev.reasons)
        raise SelfRefused(f"KMS self-authorization: this KMS's own evidence does not verify: {why}")
    verdict = await _ask_kms(backend, ev.boot)
    if not verdict.is_allowed:
        raise SelfRefused(
            f"KMS self-authorization refused by backend {backend.name} (bootAuth/kms): "
            f"{verdict.reason or 'no reason given'}"
        )
    log.info("kms self-authorized", backend=backend.name, app_id=ev.boot.app_id,
             reason=verdict.reason)  # fmt: skip
    return verdict
