"""May a KMS instance hold the cluster's root keys? The explicit authorizations, pure.

The root keys derive every app's keys, so the dev backend (which allows every attested app)
never authorizes a KMS. With it, a replica asking `GetKmsKey` is authorized explicitly, by
one of:

- the source KMS's onboarding token, presented inside the mutual RA-TLS channel and compared
  by digest in constant time;
- an allow-listed measurement of the replica's verified quote: its MRTD (48 bytes: names the
  firmware only, every TD of that image has it) or its mr_aggregated / mr_system (32 bytes).

A webhook or contract backend decides a KMS itself (`bootAuth/kms`), as in dstack. What
allowed a replica is recorded (`KmsReplicaOnboarded.authorization`): "token", "mr_td:<hex>",
"mr_aggregated:<hex>", "mr_system:<hex>" or "backend:<name>", never the token.

    policy = OnboardingPolicy(token_sha256=token_digest(token), allowed_mrs=frozenset({mr}))
    verdict, how = explicit_verdict(policy, boot, mr_td, presented_token)
"""

from __future__ import annotations

import hashlib
import hmac

import msgspec

from .auth import AuthVerdict, BootInfo

DEV_NOT_FOR_KMS = (
    "the dev backend authorizes apps only, never a KMS: a replica needs the source's "
    "onboarding token (--kms-onboard-token-file) or its measurement allow-listed "
    "(--kms-allow-mr)"
)
TOKEN = "token"
MAX_TOKEN = 256  # characters a presented token may have (a generated one has 43)


class OnboardingPolicy(msgspec.Struct, frozen=True):
    token_sha256: bytes = b""  # digest of this KMS's onboarding token; empty: none accepted
    allowed_mrs: frozenset[bytes] = frozenset()  # MRTD (48 bytes), mr_aggregated/mr_system (32)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def token_matches(policy: OnboardingPolicy, token: str) -> bool:
    """Whether `token` is this KMS's onboarding token (digests compared in constant time)."""
    if not policy.token_sha256 or not token:
        return False
    return hmac.compare_digest(token_digest(token), policy.token_sha256)


def parse_measurement(text: str) -> bytes:
    """An allow-list entry: hex of an MRTD (48 bytes) or an mr_aggregated / mr_system (32)."""
    try:
        raw = bytes.fromhex(text.strip().removeprefix("0x"))
    except ValueError:
        raw = b""
    if len(raw) not in (32, 48):
        raise ValueError(
            f"{text!r} is no measurement: give an MRTD (96 hex digits) or an mr_aggregated / "
            "mr_system (64 hex digits)"
        )
    return raw


def allowed_measurement(policy: OnboardingPolicy, boot: BootInfo, mr_td: bytes) -> str:
    """The allow-listed measurement of a verified boot, as "<name>:<hex>"; '' when none is."""
    named = (("mr_aggregated", boot.mr_aggregated), ("mr_system", boot.mr_system))
    for name, value in (("mr_td", mr_td.hex()), *named):
        if value and bytes.fromhex(value) in policy.allowed_mrs:
            return f"{name}:{value}"
    return ""


def explicit_verdict(
    policy: OnboardingPolicy, boot: BootInfo, mr_td: bytes, token: str
) -> tuple[AuthVerdict, str]:
    """(verdict, what allowed it) for a replica under the dev backend."""
    if token_matches(policy, token):
        return AuthVerdict(True, "onboarding token"), TOKEN
    measured = allowed_measurement(policy, boot, mr_td)
    if measured:
        return AuthVerdict(True, f"allow-listed measurement {measured}"), measured
    if token:
        why = "the onboarding token presented is not this KMS's"
        return AuthVerdict(False, why + ("" if policy.token_sha256 else " (it has none)")), ""
    return AuthVerdict(False, DEV_NOT_FOR_KMS), ""
