"""The KMS actor: root keys, attested key release over mutual RA-TLS, decisions on the log.

svc = await KmsService.open(store, KmsSettings(cluster="main"), backend=backend,
                            collateral=source, keyfile=RootKeyFile(path, "main", seal))
async with svc, serve_kms(svc, "127.0.0.1", 9100) as url:
    ...
"""

from .backends import BackendConfigError, DevBackend, WebhookBackend, make_backend
from .bootview import make_recheck
from .client import KmsCallError, KmsClient, ratls_identity
from .evidence import Evidence, check_attestation, policy_json
from .http import make_app, serve_kms
from .keystore import GuestAgentSealKey, KeyProviderSealKey, KeystoreError, RootKeyFile
from .onboard import onboard_replica
from .service import Denied, KmsError, KmsService, KmsSettings, NotOnboarded

__all__ = [
    "BackendConfigError",
    "Denied",
    "DevBackend",
    "Evidence",
    "GuestAgentSealKey",
    "KeyProviderSealKey",
    "KeystoreError",
    "KmsCallError",
    "KmsClient",
    "KmsError",
    "KmsService",
    "KmsSettings",
    "NotOnboarded",
    "RootKeyFile",
    "WebhookBackend",
    "check_attestation",
    "make_app",
    "make_backend",
    "make_recheck",
    "onboard_replica",
    "policy_json",
    "ratls_identity",
    "serve_kms",
]
