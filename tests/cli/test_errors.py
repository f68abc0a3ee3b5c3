"""What a user gets wrong gets one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import hashlib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from pydstack.adapters.nats import NatsServer, free_port
from pydstack.cli._common import parse_point
from pydstack.cli.commands import compose_identity, parse_port, parse_size_mb
from pydstack.cli.main import main
from pydstack.core.events import PortMap


def invoke(tmp_path: Path, *args: str) -> Result:
    # An empty data dir: nothing local to find, as on a fresh machine.
    return CliRunner().invoke(main, ["--data-dir", str(tmp_path / "home"), *args], env={
        "PYDSTACK_NATS": None, "PYDSTACK_HOME": None, "PYDSTACK_CREDS": None})  # fmt: skip


def one_line_error(r: Result) -> str:
    assert r.exit_code != 0
    assert r.exc_info is None or isinstance(r.exc_info[1], SystemExit), r.exc_info
    assert "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if x.startswith("Error:")]
    assert len(lines) == 1, r.output
    return lines[0]


@pytest.mark.parametrize("command", [["events"], ["audit"], ["status"], ["replay"],
                                     ["vm", "request", "--app-id", "a"]])  # fmt: skip
def test_unreachable_server(tmp_path: Path, command: list[str]) -> None:
    port = free_port()
    r = invoke(tmp_path, "--nats", f"nats://127.0.0.1:{port}", *command)
    assert r.exit_code == 1
    assert f"NATS server at nats://127.0.0.1:{port} is unreachable (connection refused)" \
        in one_line_error(r)  # fmt: skip


@pytest.mark.parametrize("command", [["events"], ["audit"], ["status"], ["replay"]])
def test_stream_missing(tmp_path: Path, nats_server: NatsServer, command: list[str]) -> None:
    r = invoke(tmp_path, "--nats", nats_server.url, *command)
    assert r.exit_code == 1
    assert "stream 'DSTACK' does not exist" in one_line_error(r)


@pytest.mark.parametrize("command", [["host", "add", "h2"], ["host", "remove", "h2"],
                                     ["tenant", "add", "alice"]])  # fmt: skip
def test_admin_commands_without_the_admin_identity(tmp_path: Path, command: list[str]) -> None:
    r = invoke(tmp_path, *command)
    assert r.exit_code == 1 and "admin" in one_line_error(r)


def test_a_seed_given_as_a_public_key_is_refused_and_not_echoed() -> None:
    from pydstack.cli.tenant import _public_key

    seed = "SUAM3TUDIBPC5I4R4CFVDOMOEZ4RL2G6O4VYOUK5B5QXAMMFGB3OCGKQEY"
    with pytest.raises(click.BadParameter) as exc:
        _public_key(seed)
    assert seed[:8] not in str(exc.value) and "a seed, not a public key" in str(exc.value)


def test_bad_compose_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = invoke(tmp_path, "app", "register", str(bad))
    assert r.exit_code == 2 and "bad.json is not JSON" in one_line_error(r)
    r = invoke(tmp_path, "app", "register", str(tmp_path / "missing.json"))
    assert r.exit_code == 2 and "No such file" in one_line_error(r)


@pytest.mark.parametrize("value", ["80", "a:b", "tcp:0.0.0.0:1:2:3", "70000:80", "0:80"])
def test_bad_port_syntax(tmp_path: Path, value: str) -> None:
    r = invoke(tmp_path, "vm", "request", "--app-id", "a", "--port", value)
    assert r.exit_code == 2
    assert "Invalid value for '--port'" in one_line_error(r)


def test_bad_arguments(tmp_path: Path) -> None:
    assert invoke(tmp_path, "vm", "request").exit_code == 2  # --app-id missing
    r = invoke(tmp_path, "vm", "request", "--app-id", "a", "--memory", "lots")
    assert "not a size" in one_line_error(r)
    r = invoke(tmp_path, "events", "--since", "last tuesday")
    assert "is not a sequence" in one_line_error(r)
    r = invoke(tmp_path, "vm", "request", "--app-id", "bad id!")
    assert "bad app id" in one_line_error(r)


def test_port_maps_parse_like_dstack() -> None:
    assert parse_port("8080:80") == PortMap(host_port=8080, vm_port=80)
    assert parse_port("udp:0.0.0.0:5353:53") == PortMap(protocol="udp", host_address="0.0.0.0",
                                                        host_port=5353, vm_port=53)  # fmt: skip
    assert parse_port("10.0.0.1:443:8443").host_address == "10.0.0.1"


def test_sizes_are_megabytes() -> None:
    assert [parse_size_mb(v) for v in ("512M", "2G", "2048", "1T", "4GiB")] == \
        [512, 2048, 2048, 1024 * 1024, 4096]  # fmt: skip
    with pytest.raises(click.BadParameter):
        parse_size_mb("-1G")


def test_points_are_sequences_times_or_ages() -> None:
    assert parse_point("42") == ("seq", 42)
    assert parse_point("2025-01-31T12:00:00Z") == ("time", 1738324800.0)
    assert parse_point("10m", now=1000.0) == ("time", 400.0)


def test_compose_ids_are_dstack_compatible() -> None:
    raw = b'{"name": "x"}'
    digest = hashlib.sha256(raw).hexdigest()
    assert compose_identity(raw, "f")[:2] == (digest[:40], digest)
    named = b'{"app_id": "0xabcdef", "name": "x"}'
    assert compose_identity(named, "f")[0] == "abcdef"


def test_init_creates_the_stream_once(tmp_path: Path, nats_server: NatsServer) -> None:
    r = invoke(tmp_path, "--nats", nats_server.url, "init")
    assert r.exit_code == 0 and "stream DSTACK is ready" in r.output
    assert invoke(tmp_path, "--nats", nats_server.url, "init").exit_code == 0
    assert invoke(tmp_path, "--nats", nats_server.url, "events").exit_code == 0  # not missing
