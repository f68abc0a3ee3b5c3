"""The real docker-compose (issue 15, item 5) keeps the env injection defences of
test_compose_env_injection.py, and refuses what would take over it or reach the sandbox's host.

Env values are the host's. compose substitutes them into parsed values, so each attack value
stays literal text in its one scalar (checked on ``docker-compose config``, which resolves the
file exactly as ``up`` does, without an engine). A variable that steers compose itself
(``DOCKER_HOST``, ``LD_PRELOAD``, ``PYTHONPATH``, ``HOME``...) is refused before compose runs;
in the sandbox a compose file that would reach the host machine (binds of host paths,
privileged, host namespaces, env_file) is refused by name before anything starts.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pydstack_guest.compose_cli import (
    YAML_TO_JSON,
    ComposeFailed,
    ComposeProject,
    _interpreter,
    compose_environ,
)

from .test_compose_env_injection import PLACES

pytestmark = pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="apt-get install docker-compose (make deps)"
)

ATTACKS = [
    "hi\n    entrypoint: [sh, -c, evil]",
    "hi\n    image: evil:latest",
    "hi\n  evil:\n    image: evil:latest\n    entrypoint: [sh, -c, evil]",
    "{entrypoint: [sh, -c, evil]}",
    "[sh, -c, evil]",
    "&anchor evil",
    "*alias",
    "!!python/object/apply:os.system {cmd: evil}",
    "a\n---\nservices: {evil: {image: evil}}",
    "'single'",
    "- item\n- item",
    "${OTHER} $$ $(touch /tmp/pwned)",
]


def resolved(tmp: Path, compose_file: str, env: dict[str, str]) -> Any:
    """The file as ``docker-compose config`` resolves it with `env` (JSON)."""

    async def run() -> Any:
        p = ComposeProject(workdir=tmp, docker_host="unix:///nonexistent.sock")
        (tmp / "docker-compose.yaml").write_text(compose_file)
        environ = compose_environ(env, docker_host=p.docker_host, home=tmp)
        config = p._argv("config", override=False)
        return await p._json(await p._run(config, environ, what="config"))

    return asyncio.run(run())


def test_attack_values_stay_literal_in_their_scalar(tmp_path: Path) -> None:
    """One run, one service per attack value: the services and keys are those the file names,
    and every value arrives whole ($ kept as compose writes it back: $$)."""
    services = "".join(f"  s{i}:\n    image: busybox:latest\n    command: [echo, '${{V{i}}}']\n"
                       f"    environment:\n      G: x${{V{i}}}y\n"
                       for i in range(len(ATTACKS)))  # fmt: skip
    env = {f"V{i}": v for i, v in enumerate(ATTACKS)}
    doc = resolved(tmp_path, "services:\n" + services, env)
    assert sorted(doc["services"]) == sorted(f"s{i}" for i in range(len(ATTACKS)))
    for i, value in enumerate(ATTACKS):
        svc = doc["services"][f"s{i}"]
        assert sorted(svc) == ["command", "environment", "image"]
        assert svc["image"] == "busybox:latest"
        esc = value.replace("$", "$$")
        assert svc["command"] == ["echo", esc] and svc["environment"] == {"G": f"x{esc}y"}


def test_the_injection_suites_file_resolves_to_the_same_services(tmp_path: Path) -> None:
    value = "hi\n  evil:\n    image: evil:latest"
    doc = resolved(tmp_path, PLACES, {"V": value})
    assert sorted(doc["services"]) == ["db", "web"]
    assert doc["services"]["web"]["environment"]["GREETING"] == value
    assert doc["services"]["db"]["image"] == "postgres:16"


@pytest.mark.parametrize(
    "name", ["DOCKER_HOST", "COMPOSE_FILE", "LD_PRELOAD", "PYTHONPATH", "HOME", "PATH",
             "https_proxy", "docker_config"],
)  # fmt: skip
def test_a_variable_that_steers_compose_is_refused(name: str) -> None:
    with pytest.raises(ComposeFailed, match=f"env {name} would steer docker-compose itself"):
        compose_environ({name: "tcp://10.9.9.9:2375"}, docker_host="unix:///x", home=Path("/"))


SOCK = "/var/run/dstack.sock"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("    privileged: true\n", "privileged gives host privileges"),
        ("    cap_add: [SYS_ADMIN]\n", "cap_add gives host privileges"),
        ("    pid: host\n", "pid: host"),
        ("    volumes: ['/:/host']\n", "bind mount of host path /"),
        ("    volumes: ['./:/x']\n", "bind mount of host path"),
        ("    volumes: ['/var/run/docker.sock:/var/run/docker.sock']\n",
         "bind mount of host path /var/run/docker.sock"),
        (f"    volumes: ['{SOCK}:/elsewhere.sock']\n", f"bind mount of host path {SOCK}"),
        ("    env_file: [/etc/shadow]\n", "env_file reads the host's files"),
        ("    devices: ['/dev/sda:/dev/sda']\n", "devices gives host privileges"),
    ],
)  # fmt: skip
def test_the_sandbox_refuses_what_reaches_the_host(tmp_path: Path, extra: str, named: str) -> None:
    """Nothing is started: the refusal comes before ``up`` (no engine answers here)."""
    text = "services:\n  web:\n    image: busybox:latest\n" + extra
    p = ComposeProject(workdir=tmp_path, docker_host="unix:///nonexistent.sock",
                       host_paths=False)  # fmt: skip
    with pytest.raises(ComposeFailed, match="refused in the sandbox") as err:
        asyncio.run(p.up(text, {}, sockets={SOCK: "/run/x/dstack.sock"}))
    assert named in str(err.value)
    assert not (tmp_path / "pydstack-override.json").exists()


def test_the_agent_socket_at_its_own_path_is_allowed(tmp_path: Path) -> None:
    """dstack's docs bind /var/run/dstack.sock at its own path: the sandbox mounts its agent
    socket there (the override file), so the check lets it through to ``up``."""
    text = f"services:\n  web:\n    image: busybox:latest\n    volumes: ['{SOCK}:{SOCK}']\n"
    p = ComposeProject(workdir=tmp_path, docker_host="unix:///nonexistent.sock",
                       host_paths=False)  # fmt: skip
    with pytest.raises(ComposeFailed, match="docker-compose up"):  # no engine: up fails
        asyncio.run(p.up(text, {}, sockets={SOCK: "/run/x/dstack.sock"}))
    override = json.loads((tmp_path / "pydstack-override.json").read_text())
    assert f"/run/x/dstack.sock:{SOCK}" in override["services"]["web"]["volumes"]


def test_yaml_is_read_by_composes_own_interpreter() -> None:
    interp = _interpreter(shutil.which("docker-compose") or "")
    assert "yaml" in YAML_TO_JSON and Path(interp).name.startswith("python")


def test_a_compose_file_with_no_services_starts_nothing(tmp_path: Path) -> None:
    p = ComposeProject(workdir=tmp_path, docker_host="unix:///nonexistent.sock",
                       host_paths=False)  # fmt: skip
    assert asyncio.run(p.up("services: {}\n", {}, sockets={})) == []


def test_a_compose_v1_file_is_refused_not_dropped(tmp_path: Path) -> None:
    p = ComposeProject(workdir=tmp_path, docker_host="unix:///nonexistent.sock")
    with pytest.raises(ComposeFailed, match="no services: mapping"):
        asyncio.run(p.up("web:\n  image: busybox\n", {}, sockets={}))
