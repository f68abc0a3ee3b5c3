from projections_given import T0, stamp

from pydstack.core.events import AppRegistered, AppRemoved, AppUpgraded
from pydstack.core.projections import App, Applied, apps


def run(*events: object) -> App | None:
    state = None
    for a in stamp(events):  # type: ignore[arg-type]
        state = apps.apply(state, a)
    return state


REG = AppRegistered(app_id="a1", compose_hash="h1", name="web", owner="alice")


def test_registered_app_has_its_compose_hash_and_no_upgrades() -> None:
    app = run(REG)
    assert app == App(
        app_id="a1",
        name="web",
        owner="alice",
        compose_hash="h1",
        history=("h1",),
        registered_ns=T0 + 1_000_000_000,
        updated_ns=T0 + 1_000_000_000,
        seq=1,
    )


def test_upgrade_moves_current_hash_and_keeps_history() -> None:
    app = run(
        REG,
        AppUpgraded(app_id="a1", compose_hash="h2", previous_compose_hash="h1"),
        AppUpgraded(app_id="a1", compose_hash="h3", previous_compose_hash="h2"),
    )
    assert app is not None
    assert (app.compose_hash, app.history, app.upgrades, app.seq) == (
        "h3",
        ("h1", "h2", "h3"),
        2,
        3,
    )


def test_removed_app_ignores_later_upgrades() -> None:
    app = run(
        REG,
        AppRemoved(app_id="a1", reason="retired"),
        AppUpgraded(app_id="a1", compose_hash="h2", previous_compose_hash="h1"),
    )
    assert app is not None
    assert (app.removed, app.removed_reason, app.compose_hash, app.seq) == (
        True,
        "retired",
        "h1",
        2,
    )


def test_second_registration_of_live_app_is_a_duplicate() -> None:
    assert run(REG, AppRegistered(app_id="a1", compose_hash="other")) == run(REG)


def test_registration_after_removal_starts_over() -> None:
    app = run(REG, AppRemoved(app_id="a1"), AppRegistered(app_id="a1", compose_hash="h9"))
    assert app is not None
    assert (app.removed, app.compose_hash, app.history) == (False, "h9", ("h9",))


def test_events_before_registration_are_ignored() -> None:
    assert run(AppUpgraded(app_id="a1", compose_hash="h2", previous_compose_hash="h1")) is None


def test_events_of_other_kinds_leave_the_app_unchanged() -> None:
    app = run(REG)
    from pydstack.core.events import HostLeft

    assert apps.apply(app, Applied(9, 0, HostLeft(host_id="h1"))) is app
