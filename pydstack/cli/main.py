"""The ``pydstack`` command. Shell completion::

eval "$(_PYDSTACK_COMPLETE=bash_source pydstack)"     # zsh: zsh_source, fish: fish_source
"""

from __future__ import annotations

import importlib

import click

from pydstack.adapters.nats import StoreError

from ._common import Settings, connection_options
from .app import app_group  # also adds ls/info/upgrade/rm to `app`
from .audit import audit_cmd, status_cmd
from .commands import init_cmd, vm_group
from .contract import app_contract
from .contract_show import app_show as _app_show  # noqa: F401 - adds `show` to both groups
from .events import events_cmd, replay_cmd
from .image_log import image_group  # image register | registered | revoke
from .up import up_cmd
from .vm import image_group as _image_group  # noqa: F401 - adds ls/info/start/stop/rm… to `vm`


class _LazyGroup(click.Group):
    """Loads commands that live in heavier modules only when they are used (fast completion)."""

    lazy: dict[str, str] = {
        "attest": "pydstack.cli.attest:attest",
        "kms": "pydstack.cli.kms:kms",  # KMS owner: serve, audit
        "env": "pydstack.cli.env:env",  # KMS owner: env encrypt
        "deploy": "pydstack.cli.deploy:deploy_cmd",  # compose file -> running app, followed
        "gateway": "pydstack.cli.gateway:gateway",  # gateway: status, routes, peers, add-domain
        "host": "pydstack.cli.host:host",  # admin: per-host keys and join bundles
        "tenant": "pydstack.cli.tenant:tenant",  # admin: tenant add (app owners' identities)
        "service": "pydstack.cli.service:service",  # systemd unit for `up`
    }

    def invoke(self, ctx: click.Context) -> object:
        # Commands that fail before their coroutine runs (e.g. no admin identity in this data
        # dir) raise StoreError outside `run`: still one line and exit 1, never a traceback.
        try:
            return super().invoke(ctx)
        except StoreError as exc:
            raise click.ClickException(str(exc)) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, _, attr = self.lazy[cmd_name].partition(":")
            try:
                command = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise click.ClickException(f"`{cmd_name}` is not available: {exc}") from None
            if not isinstance(command, click.Command):
                return None
            return command
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@connection_options
@click.version_option(package_name="pydstack")
@click.pass_context
def main(ctx: click.Context) -> None:
    """pydstack: an event-sourced dstack control plane on NATS JetStream.

    Start one with `pydstack up`, then use the other commands against it (they find it
    through ./.pydstack, $PYDSTACK_HOME or --nats).
    """
    ctx.ensure_object(Settings)


for command in (
    up_cmd,
    init_cmd,
    vm_group,
    app_group,
    events_cmd,
    replay_cmd,
    audit_cmd,
    status_cmd,
    image_group,
):
    main.add_command(command)
app_group.add_command(app_contract, "contract")  # deploy | add-compose-hash | add-device
