"""The web dashboard served by ``pydstack up``: live views of the log, commands, a deploy form.

Pages (plain HTML + JS modules from ``static/``, no build step): hosts, apps, VMs (with
start/stop/remove), KMS key decisions with their BootInfo, gateways and routes, the live
event stream, and a deploy form that seals env vars in the browser (WebCrypto X25519 +
AES-GCM, dstack-sdk's ``encrypt_env_vars`` format). JSON under ``/api/``; live updates as
server-sent events on ``/api/stream``. Only requests naming one of the dashboard's own Hosts
are answered (DNS rebinding), writes need the page's CSRF token or the login token, and a
dashboard not bound to loopback wants the login token on every request (``_guard``). Usage::

    async with await Dashboard.create(operator_store, DashboardConfig(port=8080)) as dash:
        print(dash.url)
"""

from ._api import create_app
from ._commands import (
    BadInput,
    CommandRefused,
    ComposeRequest,
    DeployRequest,
    build_app_compose,
    compose_ids,
    decide_vm_command,
    plan_deploy,
)
from ._envkey import DevEnvKey, EnvKey, EnvKeyError, EnvKeySource, KmsEnvKey
from ._follower import Follower, Hub, Update
from ._guard import Guard, GuardError, allowed_hosts, load_or_create_token, needs_login, parse_host
from ._server import Dashboard, DashboardConfig
from ._services import Services
from ._state import EventRow, KeyDecision, LiveState

__all__ = [
    "BadInput", "CommandRefused", "ComposeRequest", "Dashboard", "DashboardConfig",
    "DeployRequest", "DevEnvKey", "EnvKey", "EnvKeyError", "EnvKeySource", "EventRow",
    "Follower", "Guard", "GuardError", "Hub", "KeyDecision", "KmsEnvKey", "LiveState",
    "Services", "Update", "allowed_hosts", "build_app_compose", "compose_ids", "create_app",
    "decide_vm_command", "load_or_create_token", "needs_login", "parse_host", "plan_deploy",
]  # fmt: skip
