"""Attack: a compose version the owner withdrew (say, one with a known hole) keeps getting
keys; or another tenant withdraws a version of an app it does not own.

The owner's ``AppComposeRevoked`` shrinks what the log backend allows (KMS and gateway read
the same set); history stays add-only and auditable. Only the app's owner (or an admin) may
write it: every fold refuses anyone else's. Real NATS for the backend; the write policy pure.
"""

from __future__ import annotations

from pydstack.actors.kms.log_backend import LogBackend
from pydstack.adapters.nats import NEW, EventStore
from pydstack.core.events import AppComposeRevoked, AppRegistered, AppUpgraded, subject
from pydstack.core.kms.auth import BootInfo
from pydstack.core.policy import Gate, Refused
from tests.policy.given import ADMIN, TENANT_A, TENANT_B, Log

APP = "ab" * 20
V1, V2 = "11" * 32, "22" * 32


def boot(compose: str) -> BootInfo:
    return BootInfo(tcb_status="UpToDate", app_id=APP, compose_hash=compose)


async def test_a_revoked_version_gets_no_key_and_the_others_still_do(store: EventStore) -> None:
    backend = LogBackend(store)
    subj = subject("app", APP)
    v = await store.append(subj, [AppRegistered(app_id=APP, compose_hash=V1),
                                  AppUpgraded(app_id=APP, compose_hash=V2,
                                              previous_compose_hash=V1)], NEW)  # fmt: skip
    assert (await backend.authorize_app(boot(V1))).is_allowed
    v = await store.append(subj, [AppComposeRevoked(app_id=APP, compose_hash=V1,
                                                    reason="CVE-2026-1")], v)  # fmt: skip
    denied = await backend.authorize_app(boot(V1))
    assert not denied.is_allowed and f"compose hash {V1} is not one app" in denied.reason
    assert (await backend.authorize_app(boot(V2))).is_allowed
    # only the owner naming it again (a deliberate upgrade) allows it again
    await store.append(subj, [AppUpgraded(app_id=APP, compose_hash=V1,
                                          previous_compose_hash=V2)], v)  # fmt: skip
    assert (await backend.authorize_app(boot(V1))).is_allowed


def test_only_the_owner_or_an_admin_may_revoke_a_version() -> None:
    log = Log()
    log.keyring(TENANT_A, TENANT_B)
    subj = f"dstack.app.{APP}"
    log.add(TENANT_A, subj, AppRegistered(app_id=APP, compose_hash=V1, owner="tenant-a"))
    by_other = log.add(TENANT_B, subj, AppComposeRevoked(app_id=APP, compose_hash=V1))
    by_owner = log.add(TENANT_A, subj, AppComposeRevoked(app_id=APP, compose_hash=V1))
    by_admin = log.add(ADMIN, subj, AppComposeRevoked(app_id=APP, compose_hash=V1))
    gate = Gate.pinned(ADMIN.public_key)
    got = {seq: gate.judge(seq, s, d) for seq, s, d in log.records}
    assert isinstance(got[by_other], Refused) and got[by_other].reason == "not-owner"
    assert not isinstance(got[by_owner], Refused)
    assert not isinstance(got[by_admin], Refused)
