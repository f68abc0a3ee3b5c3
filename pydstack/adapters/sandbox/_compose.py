"""The compose app of an app-compose.json, reduced to image, command, entrypoint and
environment: the runner of guest images without ``docker-compose`` (`pydstack_guest.compose_app`
says so at the ``app`` stage); sandbox CVMs run the real compose (`pydstack_guest.compose_cli`).

dstack's ``docker_compose_file`` is YAML; without a YAML library this reads JSON or the
block-style subset compose files use (nested mappings, ``- item`` lists, plain or quoted
scalars, ``#`` comments). Flow collections other than ``[a, b]`` are refused with the line.

Env values are the host's (only their names are the app's), so they are substituted as
``docker compose`` does: into the string values of the parsed file, never into its text, and
the result is never parsed again. A value cannot add a key or a service, or change the file's
structure; whatever it holds stays literal text in the scalar it was put into.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from typing import Any

import msgspec


class ComposeError(ValueError):
    pass


class Service(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    image: str
    command: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    environment: dict[str, str] = {}
    mounts_dstack_sock: bool = True  # the guest agent socket is always offered


def _scalar(text: str) -> Any:
    t = text.strip()
    if not t:
        return None
    if t[0] in "\"'" and t[-1] == t[0] and len(t) >= 2:
        return json.loads(t) if t[0] == '"' else t[1:-1].replace("''", "'")
    if t.startswith("[") and t.endswith("]"):
        return [_scalar(x) for x in t[1:-1].split(",") if x.strip()]
    if t.startswith(("{", "|", ">", "&", "*")):
        raise ComposeError(f"unsupported YAML construct {t[:20]!r}")
    return t


def _strip(line: str) -> str:
    out, quote = [], ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            break
        out.append(ch)
    return "".join(out).rstrip()


def parse_yaml(text: str) -> Any:
    """JSON, or the block subset of YAML described in the module doc."""
    if text.lstrip().startswith("{"):
        return json.loads(text)
    lines = [(len(s) - len(s.lstrip(" ")), s.strip()) for s in map(_strip, text.splitlines())]
    lines = [x for x in lines if x[1] and x[1] != "---"]
    value, end = _block(lines, 0, lines[0][0] if lines else 0)
    if end != len(lines):
        raise ComposeError(f"cannot parse compose YAML near {lines[end][1]!r}")
    return value


_MAPPING = re.compile(r":(\s|$)")  # YAML's key indicator: a colon before a space or the end


def _block(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[Any, int]:
    if i >= len(lines):
        return None, i
    if lines[i][1].startswith("- ") or lines[i][1] == "-":
        items: list[Any] = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("-"):
            rest = lines[i][1][1:].strip()
            if rest and _MAPPING.search(rest) and not rest.startswith(("'", '"')):
                # "- key: value" starts a mapping item ("- A=http://x" is a scalar)
                sub = [(indent + 2, rest), *lines[i + 1 :]]
                item, used = _block(sub, 0, indent + 2)
                items.append(item)
                i += used
            elif rest:
                items.append(_scalar(rest))
                i += 1
            else:
                item, i = _block(lines, i + 1, lines[i + 1][0] if i + 1 < len(lines) else indent)
                items.append(item)
        return items, i
    out: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent:
        key, sep, rest = lines[i][1].partition(":")
        if not sep:
            raise ComposeError(f"expected 'key: value', got {lines[i][1]!r}")
        key = str(_scalar(key))
        if rest.strip():
            out[key] = _scalar(rest)
            i += 1
        elif i + 1 < len(lines) and lines[i + 1][0] > indent:
            out[key], i = _block(lines, i + 1, lines[i + 1][0])
        elif i + 1 < len(lines) and lines[i + 1][0] == indent and lines[i + 1][1].startswith("-"):
            out[key], i = _block(lines, i + 1, indent)
        else:
            out[key] = None
            i += 1
    return out, i


def _words(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, list):
        return tuple(str(x) for x in v)
    try:
        return tuple(shlex.split(str(v)))
    except ValueError as e:  # the text may hold env values (secrets): not in the message
        raise ComposeError(f"a string command or entrypoint is not shell words ({e}); "
                           "write it as a list") from None  # fmt: skip


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPS = (":-", ":?", ":+", "-", "?", "+")


def _closing(text: str, i: int) -> int:
    """The index of the ``}`` closing the ``${`` just before `i` (only ``${`` nests, as in
    compose), or -1."""
    depth = 1
    while i < len(text):
        if text.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _braced(inner: str, env: Mapping[str, str]) -> str:
    m = _NAME.match(inner)
    op = next((o for o in _OPS if m and inner.startswith(o, m.end())), None)
    if m is None or (op is None and m.end() != len(inner)):
        raise ComposeError(f"invalid interpolation format in ${{{inner}}}")
    name, value = m.group(), env.get(m.group())
    if op is None:
        return value or ""
    word = inner[m.end() + len(op) :]
    missing = value is None or (op[0] == ":" and value == "")
    if op[-1] == "?":
        if missing:
            raise ComposeError(f"required variable {name} is missing a value: {word}")
        return value or ""
    if op[-1] == "-":
        return interpolate(word, env) if missing else value or ""
    return "" if missing else interpolate(word, env)  # "+": the word when set


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's substitution in one string value: ``$$`` is ``$``; ``$VAR`` and ``${VAR}``
    are VAR's value ("" when unset); ``${VAR:-word}`` / ``${VAR-word}`` the word when VAR is
    unset or empty / unset; ``${VAR:?err}`` / ``${VAR?err}`` an error then; ``${VAR:+word}`` /
    ``${VAR+word}`` the word when set and not empty / set. The word is itself interpolated;
    a value never is. ``$`` before anything else is kept; a bad ``${`` is an error.
    ::

        interpolate("${A:-x}-$$A", {"A": ""}) == "x-$A"
    """
    out: list[str] = []
    i = 0
    while (j := text.find("$", i)) >= 0:
        out.append(text[i:j])
        if text.startswith("$$", j):
            out.append("$")
            i = j + 2
        elif text.startswith("${", j):
            end = _closing(text, j + 2)
            if end < 0:
                raise ComposeError(f"invalid interpolation format in {text[j : j + 40]!r}: no }}")
            out.append(_braced(text[j + 2 : end], env))
            i = end + 1
        elif m := _NAME.match(text, j + 1):
            out.append(env.get(m.group(), ""))
            i = m.end()
        else:
            out.append("$")
            i = j + 1
    out.append(text[i:])
    return "".join(out)


def interpolate_values(doc: Any, env: Mapping[str, str]) -> Any:
    """`doc` with `interpolate` applied to every string value in it (mappings and lists
    recursively; keys and other scalars as they are), as compose treats a parsed file."""
    if isinstance(doc, str):
        return interpolate(doc, env)
    if isinstance(doc, dict):
        return {k: interpolate_values(v, env) for k, v in doc.items()}
    if isinstance(doc, list):
        return [interpolate_values(v, env) for v in doc]
    return doc


def _entry(item: str, given: Mapping[str, str]) -> tuple[str, str]:
    name, eq, value = item.partition("=")
    return (name, value) if eq else (name, given.get(name, ""))


def services(app_compose: bytes, env: Mapping[str, str] | None = None) -> list[Service]:
    """The services of an app-compose.json (``docker_compose_file``), in file order.

    With `env` (the boot's allowed env), the parsed file's string values are interpolated as
    ``docker compose`` does with its environment (`interpolate_values`), and a bare ``- NAME``
    environment entry takes NAME's value from it."""
    try:
        compose = json.loads(app_compose or b"{}")
    except ValueError as e:
        raise ComposeError(f"app-compose.json is not JSON: {e}") from None
    text = compose.get("docker_compose_file") or ""
    if not text:
        return []
    given: Mapping[str, str] = env or {}
    doc = parse_yaml(text)
    if env is not None:  # into parsed values only, never re-parsed
        doc = interpolate_values(doc, env)
    out: list[Service] = []
    for name, svc in ((doc or {}).get("services") or {}).items():
        if not isinstance(svc, dict) or not svc.get("image"):
            raise ComposeError(f"service {name!r} has no image")
        raw = svc.get("environment") or {}
        if isinstance(raw, list):
            raw = dict(_entry(str(x), given) for x in raw)
        out.append(
            Service(
                name=str(name), image=str(svc["image"]), command=_words(svc.get("command")),
                entrypoint=_words(svc.get("entrypoint")),
                environment={str(k): given.get(str(k), "") if v is None else str(v)
                             for k, v in raw.items()},
            )
        )  # fmt: skip
    return out
