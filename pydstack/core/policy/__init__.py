"""The write policy and the keyring: an event counts only if its signer's role may write it.

Pure data and pure functions: :data:`ROLES` (NATS subjects per role), :data:`WRITERS`
((event type, subject kind) -> roles) and the host-bound owner rule in :class:`Policy`; the
:class:`Keyring` folded from ``dstack.keyring.*``; and :func:`verdict`, the one check every
fold and the auditor apply. Usage::

    gate = Gate.pinned(admin_public_key)
    for seq, subject, data in records:          # stream order
        v = gate.judge(seq, subject, data)
        if isinstance(v, Allowed) and v.event is not None:
            fold(v.event)
"""

from ._keyring import Binding, Keyring, additions, entry_error
from ._keyring import apply as apply_keyring
from ._table import (
    ADMIN,
    APP_ADMINS,
    APP_BOUND,
    AUDITOR,
    BLOB_WRITERS,
    GATEWAY,
    HOST_BOUND,
    KMS,
    NAME,
    OPERATOR,
    POLICY,
    ROLES,
    SCHEDULER,
    TENANT,
    VMM,
    WRITERS,
    Policy,
    Role,
)
from ._verdict import (
    REASONS,
    STRUCTURAL,
    Allowed,
    Gate,
    Refused,
    Verdict,
    app_owner_key,
    verdict,
    vm_app_key,
)

KEYRING_SUBJECT = "dstack.keyring.main"
KEYRING_FILTER = "dstack.keyring.*"

__all__ = [
    "ADMIN", "APP_ADMINS", "APP_BOUND", "AUDITOR", "BLOB_WRITERS", "GATEWAY", "HOST_BOUND",
    "KEYRING_FILTER", "KEYRING_SUBJECT", "KMS",
    "NAME", "OPERATOR", "POLICY", "REASONS", "ROLES", "SCHEDULER", "STRUCTURAL", "TENANT", "VMM",
    "WRITERS", "Allowed", "Binding", "Gate", "Keyring", "Policy", "Refused", "Role", "Verdict",
    "additions", "app_owner_key", "apply_keyring", "entry_error", "verdict", "vm_app_key",
]  # fmt: skip
