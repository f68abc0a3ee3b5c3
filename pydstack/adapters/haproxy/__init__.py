"""The HAProxy gateway data plane, driven live through HAProxy's runtime API.

Usage::

    from pydstack.adapters.haproxy import HaproxyConfig, HaproxyPlane
    async with await HaproxyPlane.create(HaproxyConfig(port=443), certs, table) as plane:
        await plane.set_table(next_table)      # map/server diffs, no reload
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
