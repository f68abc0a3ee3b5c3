"""The HAProxy gateway data plane, driven live through HAProxy's runtime API.

Usage::

    from pydstack.adapters.haproxy import HaproxyConfig, HaproxyPlane
    async with await HaproxyPlane.create(HaproxyConfig(port=443), certs, table) as plane:
        await plane.set_table(next_table)      # map/server diffs, no reload

It passes the same contract as the built-in proxy (``tests/proxy/contract.py``). Where it
differs by design:

- App ids: ``apps.map`` names the app's one freshest instance (recomputed on every table
  and every ``refresh_interval``); the built-in dials the ``top_n`` freshest at once and
  keeps the first that connects, so it also rides over a fresh instance with a closed port.
  The choice ignores the requested port; the built-in filters instances by port first.
- Custom domains are a map pushed with ``set_table(custom_domains=...)``; HAProxy cannot
  call the built-in's per-connection resolver (DNS TXT ``_dstack-app-address``).
- Timeouts: no total-duration cap; the TLS handshake is bounded by the idle timeout
  (``timeout client``); idle timeouts are not counted. A client that closes before sending
  anything counts as ``handshake_timeout`` (the built-in: ``client_eof``).
- Ports that ask for a PROXY header use one of ``pp_slots`` slot backends per header
  version; more such (instance, port) pairs raise `SlotsExhausted` (restart with more).
"""

from .config import REFUSALS, HaproxyConfig, RunPaths, render_config
from .maps import PlaneState, SlotsExhausted, SlotTarget, desired_state, diff_commands, freshest
from .plane import HaproxyPlane, PlaneStats
from .process import HaproxyProcess, check_config, haproxy_version
from .runtime import HaproxyError, RuntimeApi

__all__ = [
    "REFUSALS",
    "HaproxyConfig",
    "HaproxyError",
    "HaproxyPlane",
    "HaproxyProcess",
    "PlaneState",
    "PlaneStats",
    "RunPaths",
    "RuntimeApi",
    "SlotTarget",
    "SlotsExhausted",
    "check_config",
    "desired_state",
    "diff_commands",
    "freshest",
    "haproxy_version",
    "render_config",
]
