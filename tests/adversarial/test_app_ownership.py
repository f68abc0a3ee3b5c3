"""Attack: a tenant (or the host's operator) upgrades, removes or runs another tenant's app.

Any key that could write ``dstack.app.*`` could append ``AppUpgraded`` for any app: a second
tenant, or the untrusted host operator's CLI identity, swapped the compose every fold then
ran. Now the key that signed an app's first ``AppRegistered`` owns it; only that key or admin
writes the app's events afterwards, and a tenant requests and commands only VMs of its own
apps. Every fold refuses the rest (``not-owner``, the shared verdict), ``audit`` names each
sequence, and the CLI refuses before appending (real NATS throughout)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pydstack.actors._placement_view import PlacementView
from pydstack.actors.dashboard import LiveState
from pydstack.actors.trust import Judge, ensure_keyring
from pydstack.actors.vmm._view import LogView
from pydstack.adapters.nats import (
    EventStore,
    NatsServer,
    Recorded,
    StreamSettings,
)
from pydstack.adapters.nats.identity import IdentityStore
from pydstack.adapters.sqlite import ReadModel
from pydstack.cli.main import main as cli_main
from pydstack.core.audit import Auditor
from pydstack.core.events import (
    AppRegistered,
    AppRemoved,
    AppUpgraded,
    Signer,
    VmRequested,
    VmStopRequested,
)
from pydstack.core.policy import Gate, Refused
from tests.adversarial.writers import forge, keyed_store, wanted
from tests.policy.given import (
    ADMIN,
    GATEWAY,
    KMS,
    OPERATOR,
    RES,
    SCHEDULER,
    TENANT_A,
    TENANT_B,
    VMM1,
    VMM2,
)

ANCHOR = ADMIN.public_key
EVERYONE = (ADMIN, OPERATOR, SCHEDULER, VMM1, VMM2, KMS, GATEWAY, TENANT_A, TENANT_B)
WANTED = wanted(*EVERYONE)
APP_A = "a1" * 20  # tenant A's app
APP_OP = "0b" * 20  # the operator's own app
SUBJ_A = f"dstack.app.{APP_A}"


@pytest.fixture
def signer() -> Signer:
    return ADMIN


@pytest.fixture
async def store(nats_server: NatsServer) -> AsyncIterator[EventStore]:
    async with keyed_store(nats_server.url, ADMIN, WANTED) as s:
        yield s


def registered(app_id: str, h: str = "c1") -> AppRegistered:
    return AppRegistered(app_id=app_id, compose_hash=h, name="web", compose=b"{}")


def upgraded(app_id: str, h: str, prev: str = "c1") -> AppUpgraded:
    return AppUpgraded(app_id=app_id, compose_hash=h, previous_compose_hash=prev, compose=b"{}")


def vm_of(app_id: str, vm_id: str) -> VmRequested:
    return VmRequested(vm_id=vm_id, app_id=app_id, name=vm_id, resources=RES)


async def all_records(store: EventStore) -> list[Recorded]:
    return [r async for r in store.read()]


async def every_fold(store: EventStore, tmp: Path) -> dict[str, Any]:
    """Each fold's refused sequences and the compose hash it holds for tenant A's app."""
    recs = await all_records(store)
    out: dict[str, Any] = {}
    gate = Gate.pinned(ANCHOR)
    out["policy"] = {r.seq: v.reason for r in recs
                     if isinstance(v := gate.judge(r.seq, r.subject, r.data), Refused)}  # fmt: skip
    auditor = Auditor(anchor=ANCHOR, first_seq=1)
    for r in recs:
        auditor.check(r.seq, r.subject, r.data)
    out["audit"] = dict(auditor.refused)
    view = LogView()  # a host's VMM
    view.judge.pin(ANCHOR)
    for r in recs:
        view.fold(r.seq, r.subject, r.data)
    out["vmm"] = (set(view.judge.refused), view.app_compose.get(APP_A))
    live = LiveState()  # the dashboard
    live.judge.pin(ANCHOR)
    live.apply(recs)
    app = live.proj.apps.get(APP_A)
    out["dashboard"] = (set(live.judge.refused), app.compose_hash if app else None)
    with ReadModel.open(tmp / f"rm-{time.monotonic_ns()}.db", anchor=ANCHOR) as rm:
        got = rm.apply_messages(recs)
        row = rm.get_app(APP_A)
        out["read-model"] = (got.refused, row.compose_hash if row else None)
    placement = PlacementView(judge=Judge("scheduler", ANCHOR))  # learns apps, judges VMs
    placement.fold(recs)
    out["scheduler"] = set(placement.judge.refused)
    consumer = Judge("runtime", ANCHOR)  # a durable consumer on vm/app subjects, mid-stream
    for r in recs:
        if r.subject.startswith(("dstack.vm.", "dstack.app.")):
            await consumer.admit_read(store, r.seq, r.subject, r.data)
    out["runtime"] = set(consumer.refused)
    return out


def _only(out: dict[str, Any], refused: dict[int, str], compose: str, tmp: Path) -> None:
    """Every fold refused exactly ``refused`` and holds ``compose`` for tenant A's app."""
    assert out["policy"] == out["audit"] == refused
    assert out["vmm"] == (set(refused), compose)
    assert out["dashboard"] == (set(refused), compose)
    assert out["read-model"] == (len(refused), compose)
    assert out["runtime"] == set(refused)


async def test_a_second_tenant_cannot_upgrade_or_remove_the_first_tenants_app(
    store: EventStore, nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    await forge(url, TENANT_A, SUBJ_A, registered(APP_A))
    bad = await forge(url, TENANT_B, SUBJ_A, upgraded(APP_A, "evil"))
    gone = await forge(url, TENANT_B, SUBJ_A, AppRemoved(app_id=APP_A, reason="mine now"))
    again = await forge(url, TENANT_B, SUBJ_A, registered(APP_A, "evil"))  # re-register: no
    out = await every_fold(store, tmp_path)
    _only(out, {bad: "not-owner", gone: "not-owner", again: "not-owner"}, "c1", tmp_path)


async def test_the_host_operator_cannot_upgrade_a_tenants_app_but_keeps_its_own(
    store: EventStore, nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    await forge(url, TENANT_A, SUBJ_A, registered(APP_A))
    bad = await forge(url, OPERATOR, SUBJ_A, upgraded(APP_A, "evil"))
    await forge(url, OPERATOR, f"dstack.app.{APP_OP}", registered(APP_OP))
    own = await forge(url, OPERATOR, f"dstack.app.{APP_OP}", upgraded(APP_OP, "c2"))
    out = await every_fold(store, tmp_path)
    _only(out, {bad: "not-owner"}, "c1", tmp_path)
    assert own not in out["policy"]


async def test_the_owner_and_admin_may_upgrade_a_tenants_app(
    store: EventStore, nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    await forge(url, TENANT_A, SUBJ_A, registered(APP_A))
    await forge(url, TENANT_A, SUBJ_A, upgraded(APP_A, "c2"))
    _only(await every_fold(store, tmp_path), {}, "c2", tmp_path)
    await forge(url, ADMIN, SUBJ_A, upgraded(APP_A, "c3", "c2"))
    _only(await every_fold(store, tmp_path), {}, "c3", tmp_path)


async def test_a_tenant_runs_and_commands_only_vms_of_its_own_apps(
    store: EventStore, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A VM under an app id is the app owner's (or the hosts'): tenant B may not request one
    of A's app, nor stop A's VM; the operator may (hosts run VMs of apps), and requesting a
    VM never changes the app's compose."""
    url = nats_server.url
    await forge(url, TENANT_A, SUBJ_A, registered(APP_A))
    await forge(url, TENANT_A, "dstack.vm.va", vm_of(APP_A, "va"))
    await forge(url, OPERATOR, "dstack.vm.vo", vm_of(APP_A, "vo"))
    b_runs = await forge(url, TENANT_B, "dstack.vm.vb", vm_of(APP_A, "vb"))
    b_stops = await forge(url, TENANT_B, "dstack.vm.va", VmStopRequested(vm_id="va"))
    nobody = await forge(url, TENANT_B, "dstack.vm.vz", vm_of("ff" * 20, "vz"))  # unregistered
    a_stops = await forge(url, TENANT_A, "dstack.vm.vo", VmStopRequested(vm_id="vo"))
    out = await every_fold(store, tmp_path)
    refused = {b_runs: "not-owner", b_stops: "not-owner", nobody: "not-owner"}
    _only(out, refused, "c1", tmp_path)
    assert out["scheduler"] == set(refused) and a_stops not in out["policy"]


# -- the CLI: --as a tenant that does not own the app exits non-zero, appends nothing ----------


def app_compose(image: str) -> str:
    import json

    yaml = f"services:\n  web:\n    image: {image}\n"
    return json.dumps({"manifest_version": 2, "name": "web", "runner": "docker-compose",
                       "docker_compose_file": yaml, "app_id": "a1" * 20})  # fmt: skip


def _cli(data: Path, url: str, *args: str) -> Any:
    return CliRunner().invoke(cli_main, ["--data-dir", str(data), "--nats", url, *args])


async def test_cli_tenant_add_and_as_another_tenant_app_upgrade_is_refused_before_appending(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"  # a data dir as `up` leaves it: admin (the anchor) and operator
    ids = IdentityStore(data / "identities")
    admin, operator = ids.ensure("admin", "admin"), ids.ensure("operator", "operator")
    settings = StreamSettings(deny_delete=False)
    store = await EventStore.connect(nats_server.url, admin.signer, settings=settings,
                                     anchor=admin.key)  # fmt: skip
    await store.ensure_stream()
    await ensure_keyring(store, [(i.key, i.name, i.role, ()) for i in (admin, operator)])
    url = nats_server.url
    for name in ("alice", "bob"):
        r = await _in_thread(_cli, data, url, "tenant", "add", name, "--out",
                             str(tmp_path / f"{name}.creds"))  # fmt: skip
        assert r.exit_code == 0, r.output
        assert f"tenant {name}:" in r.output and (tmp_path / f"{name}.creds").stat().st_mode \
            & 0o777 == 0o600  # fmt: skip
    compose = tmp_path / "app-compose.json"
    compose.write_text(app_compose("nginx"))
    r = await _in_thread(_cli, data, url, "--as", "alice", "app", "register", str(compose),
                         "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    app_id = _app_id(r.output)
    compose.write_text(app_compose("evil"))
    before = await store.last_seq()
    r = await _in_thread(_cli, data, url, "--creds", str(tmp_path / "bob.creds"), "app",
                         "upgrade", app_id, str(compose))  # fmt: skip
    assert r.exit_code != 0
    err = r.output.strip().splitlines()
    assert len(err) == 1 and "refused by the write policy (not-owner)" in err[0], r.output
    assert await store.last_seq() == before  # nothing appended
    r = await _in_thread(_cli, data, url, "--as", "operator", "app", "upgrade", app_id,
                         str(compose))  # fmt: skip
    assert r.exit_code != 0 and "not-owner" in r.output
    r = await _in_thread(_cli, data, url, "--as", "alice", "app", "upgrade", app_id,
                         str(compose))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert await store.last_seq() > before
    # VMs: bob may not run one of alice's app, nor stop alice's; alice may
    r = await _in_thread(_cli, data, url, "--as", "bob", "vm", "request", "--app-id", app_id,
                         "--vm-id", "vb")  # fmt: skip
    assert r.exit_code != 0 and "not-owner" in r.output, r.output
    r = await _in_thread(_cli, data, url, "--as", "alice", "vm", "request", "--app-id", app_id,
                         "--vm-id", "va")  # fmt: skip
    assert r.exit_code == 0, r.output
    before = await store.last_seq()
    r = await _in_thread(_cli, data, url, "--as", "bob", "vm", "stop", "va")
    assert r.exit_code != 0 and "not-owner" in r.output, r.output
    assert await store.last_seq() == before
    # a tenant's own key (its seed never on the admin's host): keygen there, add --public-nkey here
    carol = tmp_path / "carol-machine" / "carol.nk"
    r = await _in_thread(_cli, data, url, "tenant", "keygen", str(carol))
    assert r.exit_code == 0 and carol.stat().st_mode & 0o777 == 0o600, r.output
    r = await _in_thread(
        _cli, data, url, "tenant", "add", "carol", "--public-nkey", r.output.strip()
    )
    assert r.exit_code == 0 and "bound on the log's keyring" in r.output, r.output
    assert not (data / "identities" / "carol.nk").exists()
    compose.write_text(app_compose("carols"))
    r = await _in_thread(_cli, data, url, "--creds", str(carol), "app", "upgrade", app_id,
                         str(compose))  # fmt: skip
    assert r.exit_code != 0 and "not-owner" in r.output, r.output
    await store.close()


async def _in_thread(fn: Any, *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args)


def _app_id(output: str) -> str:
    import json

    for line in output.splitlines():
        if line.startswith("{"):
            return str(json.loads(line)["app_id"])
    raise AssertionError(output)


# -- the dashboard (it writes as `operator`): another owner's app is a 403, nothing appended ----


async def test_the_dashboard_as_operator_cannot_upgrade_a_tenants_app(
    store: EventStore, nats_server: NatsServer, tmp_path: Path
) -> None:
    import json

    import aiohttp

    from pydstack.actors.dashboard import Dashboard, DashboardConfig
    from tests.dashboard.plane import page_headers

    async def call(url: str, path: str, body: Any) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s:  # as the dashboard's own page posts
            headers = await page_headers(s, url)
            async with s.post(url + path, json=body, headers=headers) as r:
                return r.status, await r.json()

    def deploy_body(image: str) -> dict[str, Any]:
        return {"app_compose": app_compose(image), "vcpu": 1, "memory_mb": 256}

    tenant_compose = app_compose("nginx")
    reg = AppRegistered(
        app_id=APP_A, compose_hash="c1", name="web", compose=tenant_compose.encode()
    )
    await forge(nats_server.url, TENANT_A, SUBJ_A, reg)
    async with await EventStore.connect(nats_server.url, OPERATOR, anchor=ANCHOR) as operator:
        cfg = DashboardConfig(port=0, dev_env_key=tmp_path / "dev-env.key")
        async with await Dashboard.create(operator, cfg) as dash:
            await dash.follower.ready.wait()
            before = await store.last_seq()
            status, got = await call(dash.url, "api/deploy", deploy_body("evil"))
            assert status == 403, got
            assert "refused by the write policy (not-owner)" in got["error"], got
            assert "\n" not in json.dumps(got["error"])
            assert await store.last_seq() == before  # nothing appended


async def test_the_dashboard_writes_as_the_logged_in_tenant(
    store: EventStore, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A tenant's login token (tenant add --dashboard) signs its writes with the tenant's key:
    alice's deploy registers an app alice owns; bob's login cannot upgrade it, alice's can."""
    import aiohttp

    from pydstack.actors.dashboard import Dashboard, DashboardConfig
    from pydstack.adapters.secretfile import write_secret
    from pydstack.core.events import open_envelope

    ids = IdentityStore(tmp_path / "identities")
    tenants = {n: ids.ensure(n, "tenant") for n in ("alice", "bob")}
    await ensure_keyring(store, [(i.key, n, "tenant", ()) for n, i in tenants.items()])
    tokens = {n: f"{n}-token-{'x' * 32}" for n in tenants}
    for n, t in tokens.items():
        write_secret(tmp_path / "tenants" / f"{n}.token", t + "\n")

    async def deploy(url: str, who: str, image: str) -> tuple[int, Any]:
        body = {"app_compose": app_compose(image), "vcpu": 1, "memory_mb": 256}
        headers = {"Authorization": f"Bearer {tokens[who]}"}
        async with (
            aiohttp.ClientSession() as s,
            s.post(url + "api/deploy", json=body, headers=headers) as r,
        ):
            return r.status, await r.json()

    async with await EventStore.connect(nats_server.url, OPERATOR, anchor=ANCHOR) as operator:
        cfg = DashboardConfig(port=0, dev_env_key=tmp_path / "dev-env.key",
                              tenants_dir=tmp_path / "tenants",
                              identities_dir=tmp_path / "identities")  # fmt: skip
        async with await Dashboard.create(operator, cfg) as dash:
            await dash.follower.ready.wait()
            status, got = await deploy(dash.url, "alice", "nginx")
            assert status == 201 and got["app"] == "registered", got
            last = await store.last_by_subject(SUBJ_A)
            assert last is not None and open_envelope(last.data).key == tenants["alice"].key
            before = await store.last_seq()
            status, got = await deploy(dash.url, "bob", "evil")
            assert status == 403 and "(not-owner)" in got["error"], got
            assert await store.last_seq() == before
            status, got = await deploy(dash.url, "alice", "nginx2")
            assert status == 201 and got["app"] == "upgraded", got
