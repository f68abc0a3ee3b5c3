"""The dashboard's operator input and command decisions live in ``pydstack.core.apps`` (pure,
shared with ``pydstack deploy`` and ``pydstack app``); re-exported here for the dashboard."""

from pydstack.core.apps._commands import (
    ACTIONS,
    ENV_NAME,
    MIN_SEALED_ENV,
    BadInput,
    CommandRefused,
    CommandRequest,
    ComposeRequest,
    DeployPlan,
    DeployRequest,
    VmCommand,
    as_app_compose,
    build_app_compose,
    compose_ids,
    decide_vm_command,
    decode_body,
    parse_port,
    plan_deploy,
)

__all__ = [
    "ACTIONS", "ENV_NAME", "MIN_SEALED_ENV", "BadInput", "CommandRefused", "CommandRequest",
    "ComposeRequest", "DeployPlan", "DeployRequest", "VmCommand", "as_app_compose",
    "build_app_compose", "compose_ids", "decide_vm_command", "decode_body", "parse_port",
    "plan_deploy",
]  # fmt: skip
