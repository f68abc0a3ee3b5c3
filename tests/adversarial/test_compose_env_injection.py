"""Env values rewrite the compose file (issue 12, item 4).

Env names are the app's (``allowed_envs``) but their values are written by the untrusted
host. Substituted into the compose file's text before it is parsed, a value with a newline and
YAML indicators added ``entrypoint:``, replaced ``image:`` or added a service, and ran its code
inside the CVM with the guest agent's socket mounted. Compose substitutes into parsed values:
whatever a value holds stays literal text in the one scalar it was put into.

Each test states the services the app-compose describes after interpolation with an env (name,
image, command, entrypoint, environment), whichever runner then starts them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pydstack.adapters.sandbox._compose import Service, services


def described(compose_file: str, env: Mapping[str, str]) -> list[Service]:
    """The services `compose_file` describes once interpolated with `env`."""
    return services(json.dumps({"docker_compose_file": compose_file}).encode(), env)


# Each variable ends its service, so a value with a newline could go on at the service's indent.
TAIL = """services:
  web:
    image: busybox:latest
    command: [httpd, -f, -p, "8080"]
    environment:
      - MODE=prod
      - GREETING=${GREETING}
"""


def web(greeting: str) -> list[Service]:
    return [Service(name="web", image="busybox:latest", command=("httpd", "-f", "-p", "8080"),
                    environment={"MODE": "prod", "GREETING": greeting})]  # fmt: skip


def test_a_value_with_a_newline_cannot_add_an_entrypoint() -> None:
    value = "hi\n    entrypoint: [sh, -c, evil]"
    assert described(TAIL, {"GREETING": value}) == web(value)


def test_a_value_with_a_newline_cannot_replace_the_image() -> None:
    value = "hi\n    image: evil:latest"
    assert described(TAIL, {"GREETING": value}) == web(value)


def test_a_value_with_a_newline_cannot_add_a_service() -> None:
    value = "hi\n  evil:\n    image: evil:latest\n    entrypoint: [sh, -c, evil]"
    assert described(TAIL, {"GREETING": value}) == web(value)


# One variable in three places: a whole list item, a whole mapping value, part of an entry.
PLACES = """services:
  web:
    image: busybox:latest
    entrypoint: [/bin/sh, -c]
    command:
      - echo
      - ${V}
    environment:
      GREETING: ${V}
      MODE: prod
  db:
    image: postgres:16
    environment:
      - PASSWORD=x${V}y
"""


def places(v: str) -> list[Service]:
    return [
        Service(name="web", image="busybox:latest", entrypoint=("/bin/sh", "-c"),
                command=("echo", v), environment={"GREETING": v, "MODE": "prod"}),
        Service(name="db", image="postgres:16", environment={"PASSWORD": f"x{v}y"}),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "value",
    [
        "{entrypoint: [sh, -c, evil]}",
        "[sh, -c, evil]",
        "&anchor evil",
        "*alias",
        "!!python/object/apply:os.system {cmd: evil}",
        "a\n---\nservices: {evil: {image: evil}}",
        "image: evil",
        "hi # not a comment",
        "'single'",
        '"double"',
        "|\n  block",
        "- item\n- item",
    ],
)
def test_yaml_syntax_in_a_value_stays_literal_text(value: str) -> None:
    assert described(PLACES, {"V": value}) == places(value)


@given(st.text())
def test_any_value_is_the_substituted_scalar_verbatim(value: str) -> None:
    [web, db] = described(PLACES, {"V": value})
    assert (web.name, web.image, db.name, db.image) == (
        "web",
        "busybox:latest",
        "db",
        "postgres:16",
    )
    assert (list(web.environment), list(db.environment)) == (["GREETING", "MODE"], ["PASSWORD"])
    assert web.entrypoint == ("/bin/sh", "-c") and db.command == db.entrypoint == ()
    assert web.command == ("echo", value)
    assert web.environment == {"GREETING": value, "MODE": "prod"}
    assert db.environment == {"PASSWORD": f"x{value}y"}
