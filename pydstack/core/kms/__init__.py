"""Pure KMS logic: authorization types, dstack-compatible key derivation, decisions, audit.

root = RootKeys(ca_scalar=..., k256=...)
keys = app_key_material(root, app_id, instance_id)     # identical on every replica
outcome = decide(req, reasons=[], boot=boot, verdict=v, backend="webhook")
problems = audit_kms_log(events, recheck)
"""

from .audit import KmsState, Recheck, apply, audit_key_issued, audit_kms_log, fold, undecided
from .auth import AuthBackend, AuthVerdict, BootInfo
from .csr import CertConfig, Csr, CsrError, decode_csr, encode_csr
from .decision import (
    ABANDONED,
    KeyRequest,
    abandoned,
    backend_failure,
    boot_info,
    boot_info_from_webhook,
    decide,
    key_requested,
    precheck,
    quote_hash,
    webhook_body,
)
from .derive import (
    AppKeyMaterial,
    DerivationError,
    EnvPubKey,
    RootKeys,
    app_ca_scalar,
    app_key_material,
    dh_secret,
    env_pubkey_signer,
    env_public_key,
    hkdf,
    k256_public,
    temp_ca_scalar,
)
from .onboarding import (
    DEV_NOT_FOR_KMS,
    OnboardingPolicy,
    explicit_verdict,
    parse_measurement,
    token_digest,
)

__all__ = [
    "ABANDONED",
    "DEV_NOT_FOR_KMS",
    "AppKeyMaterial",
    "AuthBackend",
    "AuthVerdict",
    "BootInfo",
    "CertConfig",
    "Csr",
    "CsrError",
    "DerivationError",
    "EnvPubKey",
    "KeyRequest",
    "KmsState",
    "OnboardingPolicy",
    "Recheck",
    "RootKeys",
    "abandoned",
    "app_ca_scalar",
    "app_key_material",
    "apply",
    "audit_key_issued",
    "audit_kms_log",
    "backend_failure",
    "boot_info",
    "boot_info_from_webhook",
    "decide",
    "decode_csr",
    "dh_secret",
    "encode_csr",
    "env_pubkey_signer",
    "env_public_key",
    "explicit_verdict",
    "fold",
    "hkdf",
    "k256_public",
    "key_requested",
    "parse_measurement",
    "precheck",
    "quote_hash",
    "temp_ca_scalar",
    "token_digest",
    "undecided",
    "webhook_body",
]  # fmt: skip
