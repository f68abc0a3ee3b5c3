"""Compose's variable substitution (``docker compose``'s rules), applied to parsed values."""

from __future__ import annotations

import json

import pytest

from pydstack.adapters.sandbox._compose import ComposeError, interpolate, services

ENV = {"SET": "v", "EMPTY": ""}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("$$", "$"),
        ("$$SET", "$SET"),
        ("$SET", "v"),
        ("${SET}", "v"),
        ("$UNSET", ""),
        ("${UNSET}", ""),
        ("$SET_x", ""),
        ("${SET}x${SET}", "vxv"),
        ("${SET:-d}", "v"),
        ("${EMPTY:-d}", "d"),
        ("${UNSET:-d}", "d"),
        ("${SET-d}", "v"),
        ("${EMPTY-d}", ""),
        ("${UNSET-d}", "d"),
        ("${SET:+r}", "r"),
        ("${EMPTY:+r}", ""),
        ("${UNSET:+r}", ""),
        ("${SET+r}", "r"),
        ("${EMPTY+r}", "r"),
        ("${UNSET+r}", ""),
        ("${SET:?e}", "v"),
        ("${SET?e}", "v"),
        ("${EMPTY?e}", ""),
        ("${UNSET:-${SET}}", "v"),
        ("${UNSET:-a $$ b: c}", "a $ b: c"),
        ("$1 $ a$", "$1 $ a$"),
    ],
)
def test_substitution_follows_compose(template: str, expected: str) -> None:
    assert interpolate(template, ENV) == expected


@pytest.mark.parametrize("template", ["${EMPTY:?need it}", "${UNSET:?need it}", "${UNSET?need it}"])
def test_a_required_variable_without_a_value_is_an_error_naming_it(template: str) -> None:
    name = template[2:].split("?")[0].rstrip(":")
    with pytest.raises(ComposeError, match=f"required variable {name} is missing a value: need it"):
        interpolate(template, ENV)


@pytest.mark.parametrize("template", ["${", "${SET", "${}", "${1}", "${SET:}", "${SET!x}"])
def test_a_malformed_braced_variable_is_an_error(template: str) -> None:
    with pytest.raises(ComposeError, match="invalid interpolation format"):
        interpolate(template, ENV)


@pytest.mark.parametrize("value", ["${SET}", "$SET", "$$", "${UNSET:?boom}"])
def test_a_substituted_value_is_never_substituted_again(value: str) -> None:
    assert interpolate("${A}|$A|${UNSET:-$A}", {"A": value, **ENV}) == f"{value}|{value}|{value}"


def test_keys_are_not_interpolated_and_non_strings_are_kept() -> None:
    doc = {"services": {"web": {"image": "busybox:${SET}", "environment": {"${SET}": 1}}}}
    [svc] = services(json.dumps({"docker_compose_file": json.dumps(doc)}).encode(), ENV)
    assert (svc.image, svc.environment) == ("busybox:v", {"${SET}": "1"})


def test_without_an_env_nothing_is_substituted() -> None:
    yaml = "services:\n  web:\n    image: busybox\n    command: [echo, $$SET, '${SET}']\n"
    [svc] = services(json.dumps({"docker_compose_file": yaml}).encode())
    assert svc.command == ("echo", "$$SET", "${SET}")


def test_a_string_command_that_is_not_shell_words_is_a_compose_error() -> None:
    yaml = "services:\n  web:\n    image: busybox\n    command: echo ${Q}\n"
    with pytest.raises(ComposeError, match="not shell words") as e:
        services(json.dumps({"docker_compose_file": yaml}).encode(), {"Q": "secret'"})
    assert "secret" not in str(e.value)
