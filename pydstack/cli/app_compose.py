"""``pydstack app compose``: dstack's ``vmm-cli.py compose``, same options, same bytes.

    pydstack app compose --name web --docker-compose docker-compose.yaml --kms --gateway \\
        --env-file .env --output app-compose.json
    pydstack deploy app-compose.json --env-file .env

The file is byte for byte what dstack v0.5.11's vmm-cli writes for the same options (so one
docker-compose has one compose hash and app id in both tools; tests/vectors/dstack/app-compose).
A field the guest cannot honour is still written (the bytes stay dstack's) with a warning:
``deploy`` and ``app register`` refuse it, naming the field.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from pydstack.core.apps import BadInput, ComposeRequest, build_app_compose, compose_ids

from ._apps import read_env_file
from .commands import _Size, app_group


def _read(path: str, hint: str) -> str:
    """The file's text exactly (UTF-8, line ends kept), as vmm-cli reads it."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint=hint) from None


@app_group.command("compose")
@click.option("--name", required=True, help="app name")
@click.option("--docker-compose", "docker_compose", required=True, metavar="PATH",
              help="the docker-compose.yml file")  # fmt: skip
@click.option("--prelaunch-script", default=None, metavar="PATH", help="pre-launch script file")
@click.option("--kms", is_flag=True, help="enable the KMS")
@click.option("--gateway", is_flag=True, help="enable the gateway")
@click.option("--local-key-provider", is_flag=True, help="enable the local key provider")
@click.option("--key-provider", type=click.Choice(["none", "kms", "local"]), default=None,
              help="override the key provider kind")  # fmt: skip
@click.option("--key-provider-id", default=None, metavar="HEX",
              help="pin the key provider (the KMS root CA's SPKI DER)")  # fmt: skip
@click.option("--public-logs", is_flag=True, help="public logs")
@click.option("--public-sysinfo", is_flag=True, help="public sysinfo")
@click.option("--env-file", default=None, metavar="PATH",
              help="KEY=VALUE lines; their names become allowed_envs")  # fmt: skip
@click.option("--no-instance-id", is_flag=True, help="no instance id")
@click.option("--secure-time", is_flag=True, help="wait for a synchronised clock")
@click.option("--swap", type=_Size(), default=None, help="swap size (e.g. 4G); 0: none")
@click.option("--storage-fs", default="", metavar="FS",
              help="data disk file system (pydstack's option; vmm-cli has none)")  # fmt: skip
@click.option("--output", required=True, type=click.Path(dir_okay=False),
              help="where to write app-compose.json")  # fmt: skip
def app_compose_cmd(
    name: str, docker_compose: str, prelaunch_script: str | None, kms: bool, gateway: bool,
    local_key_provider: bool, key_provider: str | None, key_provider_id: str | None,
    public_logs: bool, public_sysinfo: bool, env_file: str | None, no_instance_id: bool,
    secure_time: bool, swap: int | None, storage_fs: str, output: str,
) -> None:  # fmt: skip
    """Write an app-compose.json for a docker-compose file (dstack's vmm-cli ``compose``)."""
    names = tuple(dict.fromkeys(k for k, _ in read_env_file(env_file))) if env_file else ()
    if names and not kms:
        raise click.UsageError("--env-file requires --kms (the env is sealed to a KMS key)")
    req = ComposeRequest(
        name=name, compose=_read(docker_compose, "--docker-compose"), env_names=names,
        kms_enabled=kms, gateway_enabled=gateway, local_key_provider_enabled=local_key_provider,
        key_provider=key_provider or "", key_provider_id=key_provider_id or "",
        public_logs=public_logs, public_sysinfo=public_sysinfo, no_instance_id=no_instance_id,
        secure_time=secure_time, swap_size=(swap or 0) * 1024 * 1024, storage_fs=storage_fs,
        pre_launch_script=_read(prelaunch_script, "--prelaunch-script")
        if prelaunch_script else None,
    )  # fmt: skip
    if name != name.strip() or not name.strip():
        raise click.BadParameter("empty, or spaces around it", param_hint="--name")
    try:
        text = build_app_compose(req)
    except BadInput as exc:
        raise click.BadParameter(str(exc)) from None
    raw = text.encode()
    Path(output).write_bytes(raw)
    try:
        compose_ids(text)
    except BadInput as exc:
        click.echo(f"warning: deploy and app register will refuse it: {exc}", err=True)
    digest = hashlib.sha256(raw).hexdigest()
    click.echo(f"App compose file created at: {output}")
    click.echo(f"Compose hash: {digest}")
    click.echo(f"App ID: {digest[:40]}")
