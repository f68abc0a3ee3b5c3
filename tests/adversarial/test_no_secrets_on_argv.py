"""No secret travels on a command line: ``/proc/<pid>/cmdline`` is readable by every local user.
Every option of every entry point that names a key, seed, secret or token takes a file path,
and the KMS process, given its signer seed in a file, shows no seed in its argv (and does sign
with it)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from pydstack.adapters.nats import EventStore, NatsServer
from pydstack.adapters.secretfile import SecretFileError, read_seed, write_secret
from pydstack.adapters.tdx.pki import DevPki
from pydstack.core.events import Signer, open_envelope
from pydstack_guest import create_dev_app_keys

SECRETISH = re.compile(r"seed|secret|token|passw|private|mnemonic|creds|key", re.IGNORECASE)
FILE_NAME = re.compile(r"[-_](file|dir|path|socket)$")
# public by name: --public-nkey U...; --key-provider (kms|local|none) and --key-provider-id (the
# KMS root's public key) are vmm-cli compose's option names and name no secret
PUBLIC = re.compile(r"public|^--key-provider(-id)?$", re.IGNORECASE)


def _click_commands(cmd: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None:
                yield from _click_commands(sub, f"{path} {name}")


def _entry_points() -> Iterator[tuple[str, click.Command]]:
    from pydstack.actors.gateway.__main__ import main as gateway_main
    from pydstack.actors.kms.__main__ import main as kms_main
    from pydstack.cli.main import main

    yield from _click_commands(main, "pydstack")
    yield "python -m pydstack.actors.kms", kms_main
    yield "python -m pydstack.actors.gateway", gateway_main


def _parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    from pydstack.actors.scheduler import _parser as scheduler
    from pydstack.actors.vmm._main import _parser as vmm

    yield "python -m pydstack.actors.vmm", vmm()
    yield "python -m pydstack.actors.scheduler", scheduler()


def test_no_cli_option_takes_a_secret_value() -> None:
    """A secret-named option that takes a value must take a path (click.Path, or a name or
    metavar that says FILE): the value itself would be on argv."""
    bad = []
    for where, cmd in _entry_points():
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.is_flag or p.count:
                continue
            names = [n for n in p.opts + p.secondary_opts
                     if SECRETISH.search(n) and not PUBLIC.search(n)]  # fmt: skip
            is_path = isinstance(p.type, click.Path) or p.metavar in ("FILE", "DIR", "PATH")
            if names and not is_path and not any(FILE_NAME.search(n) for n in p.opts):
                bad.append(f"{where} {names[0]}")
    for where, parser in _parsers():
        for a in parser._actions:
            names = [n for n in a.option_strings if SECRETISH.search(n)]
            if not names or a.nargs == 0:
                continue
            if a.type is not Path and not any(FILE_NAME.search(n) for n in names):
                bad.append(f"{where} {names[0]}")
    assert bad == []


def test_the_kms_signer_seed_option_is_a_file() -> None:
    from pydstack.actors.kms.__main__ import main as kms_main

    opts = {o for p in kms_main.params for o in getattr(p, "opts", [])}
    assert "--signer-seed-file" in opts and "--signer-seed-hex" not in opts


@pytest.mark.parametrize("form", ["raw", "hex", "hex-newline"])
def test_a_seed_file_holds_raw_or_hex_bytes(tmp_path: Path, form: str) -> None:
    seed = os.urandom(32)
    data = {"raw": seed, "hex": seed.hex().encode(), "hex-newline": seed.hex().encode() + b"\n"}
    assert read_seed(write_secret(tmp_path / "seed", data[form])) == seed


def test_a_seed_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "seed"
    path.write_text(os.urandom(32).hex())
    path.chmod(0o644)
    with pytest.raises(SecretFileError, match="chmod 600"):
        read_seed(path)
    path.chmod(0o600)
    path.write_text("not a seed")
    with pytest.raises(SecretFileError, match="64 hex digits"):
        read_seed(path)


def _proc(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


@pytest.mark.timeout(90)
async def test_kms_process_has_no_seed_in_its_cmdline_and_signs_with_the_file(
    nats_server: NatsServer, store: EventStore, tmp_path: Path
) -> None:
    seed = os.urandom(32)
    seed_file = write_secret(tmp_path / "kms-signer.seed", seed.hex() + "\n")
    DevPki.generate().save(tmp_path / "pki")
    write_secret(tmp_path / "appkeys.json", create_dev_app_keys(b"\x42" * 20, now=0)[1])
    argv = [sys.executable, "-m", "pydstack.actors.kms", "--nats", nats_server.url,
            "--cluster", "argv", "--port", "0", "--key-file", str(tmp_path / "root.sealed"),
            "--seal-appkeys", str(tmp_path / "appkeys.json"), "--dev-pki", str(tmp_path / "pki"),
            "--auth", "dev", "--allow-dev-auth", "--signer-seed-file", str(seed_file)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert line.startswith(b"KMS_URL="), (line, proc.stderr and proc.stderr.read())
        cmdline, environ = _proc(proc.pid, "cmdline"), _proc(proc.pid, "environ")
        for shown in (seed, seed.hex().encode(), seed.hex().upper().encode()):
            assert shown not in cmdline and shown not in environ
        records, _ = await store.read_aggregate("dstack.kms.argv")
        signers = {open_envelope(r.data).key for r in records}
        assert signers == {Signer.from_private_bytes("kms", seed).public_key}
    finally:
        proc.terminate()
        proc.wait(10)
