"""Apps, pure: the app-compose and its ids, operator input, deploy/upgrade/remove decisions,
following a deploy on the log, an app's story for the audit, and the catalogue of apps.

Shared by ``pydstack deploy`` / ``pydstack app`` / ``pydstack audit --app`` and the dashboard.
Usage::

    text = build_app_compose(ComposeRequest(name="web", compose=yaml, env_names=("TOKEN",)))
    app_id, compose_hash, doc = compose_ids(text)
    plan = plan_deploy(DeployRequest(app_compose=text, ports=("8080:80",)), vm_id="…")
    outcome, event = decide_deploy_app(app, plan)
"""

from ._catalog import AppCatalog, AppInfo, GatewayRow, KeyRow
from ._commands import (
    ACTIONS,
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
    refuse_unhonoured,
)
from ._decide import (
    Outcome,
    decide_deploy_app,
    decide_remove,
    decide_revoke_compose,
    decide_upgrade,
    live_vms,
)
from ._fields import key_provider_kind, unhonoured
from ._story import AppStory, StoryLine, boot_info_text
from ._watch import Step, Watch, step, waiting_for

__all__ = [
    "ACTIONS", "AppCatalog", "AppInfo", "AppStory", "BadInput", "CommandRefused",
    "CommandRequest", "ComposeRequest", "DeployPlan", "DeployRequest", "GatewayRow", "KeyRow",
    "Outcome", "Step", "StoryLine", "VmCommand", "Watch", "as_app_compose", "boot_info_text",
    "build_app_compose", "compose_ids", "decide_deploy_app", "decide_remove",
    "decide_revoke_compose", "decide_upgrade",
    "decide_vm_command", "decode_body", "key_provider_kind", "live_vms", "parse_port",
    "plan_deploy",
    "refuse_unhonoured", "step", "unhonoured",
    "waiting_for",
]  # fmt: skip
