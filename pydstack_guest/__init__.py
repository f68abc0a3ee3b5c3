"""dstack-compatible guest agent: the API a CVM's apps call on /var/run/dstack.sock.

agent = await GuestAgent.create(backend, LocalKeyProvider("/dstack/.host-shared/appkeys.json"),
                                GuestConfig(app_name="web"))
async with serve_agent(agent, dstack_sock="/var/run/dstack.sock"):
    ...
"""

from .agent import (
    GuestAgent,
    GuestConfig,
    RequestError,
    boot_runtime_events,
    measure_after_keys,
    measure_identity,
)
from .app import AGENT_KEY, make_app, make_tappd_app, serve_agent
from .provider import AppKeys, KeyProvider, KeyProviderError, LocalKeyProvider, create_dev_app_keys

__all__ = [
    "AGENT_KEY",
    "AppKeys",
    "GuestAgent",
    "GuestConfig",
    "KeyProvider",
    "KeyProviderError",
    "LocalKeyProvider",
    "RequestError",
    "boot_runtime_events",
    "create_dev_app_keys",
    "make_app",
    "make_tappd_app",
    "measure_after_keys",
    "measure_identity",
    "serve_agent",
]
