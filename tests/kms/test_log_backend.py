"""The log backend: an app may get keys only for a compose its own app events name."""

from __future__ import annotations

from pydstack.actors.kms.backends import make_backend
from pydstack.actors.kms.log_backend import LogBackend
from pydstack.adapters.nats import NEW, EventStore
from pydstack.core.events import (
    AppRegistered,
    AppRemoved,
    AppUpgraded,
    VmRequested,
    VmResources,
    subject,
)
from pydstack.core.kms.auth import BootInfo
from pydstack.core.kms.log_auth import allowed_composes, decide_log_auth

APP = "ab" * 20
V1, V2, EVIL = "11" * 32, "22" * 32, "ee" * 32


def boot(compose: str, app: str = APP) -> BootInfo:
    return BootInfo(tcb_status="UpToDate", app_id=app, compose_hash=compose)


def test_every_registered_or_upgraded_compose_stays_allowed_until_the_app_is_removed() -> None:
    events = [AppRegistered(app_id=APP, compose_hash=V1),
              AppUpgraded(app_id=APP, compose_hash=V2, previous_compose_hash=V1)]  # fmt: skip
    assert allowed_composes(events) == {V1, V2}
    assert allowed_composes([*events, AppRemoved(app_id=APP)]) == frozenset()
    assert decide_log_auth(boot(V1), frozenset({V1, V2})).is_allowed
    denied = decide_log_auth(boot(EVIL), frozenset({V1, V2}))
    assert not denied.is_allowed and f"compose hash {EVIL} is not one app {APP}" in denied.reason
    assert "not registered" in decide_log_auth(boot(V1), frozenset()).reason


async def test_a_vm_requested_with_another_compose_adds_nothing(store: EventStore) -> None:
    """Only app events count: a VmRequested naming the app with its own compose (what
    CreateVm appends) leaves the allowed set as the app's events made it."""
    backend = make_backend("log", store=store)
    assert isinstance(backend, LogBackend)
    assert not (await backend.authorize_app(boot(V1))).is_allowed  # not registered yet
    await store.append(subject("app", APP), [AppRegistered(app_id=APP, compose_hash=V1)], NEW)
    await store.append(subject("vm", "evil"), [VmRequested(
        vm_id="evil", app_id=APP, name="evil", image="sandbox-busybox", compose_hash=EVIL,
        resources=VmResources(vcpu=1, memory_mb=256, disk_gb=1))], NEW)  # fmt: skip
    assert (await backend.authorize_app(boot(V1))).is_allowed
    assert not (await backend.authorize_app(boot(EVIL))).is_allowed
    assert not (await backend.authorize_app(boot(V1, app="0x" + APP[:-2]))).is_allowed
    assert not (await backend.authorize_kms(boot(V1))).is_allowed


def test_a_revoked_compose_leaves_the_allowed_set_until_named_again() -> None:
    from pydstack.core.events import AppComposeRevoked

    spelt = "0x" + V1.upper()  # the same hash as a client may spell it
    events: list[object] = [AppRegistered(app_id=APP, compose_hash=V1),
                            AppUpgraded(app_id=APP, compose_hash=V2, previous_compose_hash=V1),
                            AppComposeRevoked(app_id=APP, compose_hash=spelt)]  # fmt: skip
    assert allowed_composes(events) == {V2}
    again = AppUpgraded(app_id=APP, compose_hash=V1, previous_compose_hash=V2)
    assert allowed_composes([*events, again]) == {V1, V2}
