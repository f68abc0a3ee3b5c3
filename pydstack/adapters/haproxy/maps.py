"""What HAProxy's maps and PROXY slots must hold for a routing table (pure), and the
runtime-API commands that turn one such state into the next.

The load-balancing choice is made here, not per connection: ``apps.map`` names an app's
freshest instance (most recent WireGuard handshake within ``handshake_stale``, ties by id)
and the plane recomputes it on every table change and every ``refresh_interval``. The
built-in proxy instead dials the ``top_n`` freshest instances at once and keeps the first
that connects, so it also survives a fresh instance whose port is closed; HAProxy sends
everything to the one chosen instance until the next table.

Usage::

    state = desired_state(table, now, slots_before=old.slots, pp_slots=64)
    commands = diff_commands(paths, old, state)     # then RuntimeApi.apply(commands)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydstack.core.gateway import RoutingTable

from .config import MAPS, RunPaths, slot_names

_NAME_RE = re.compile(r"^[a-z0-9_.:-]+$")


class SlotsExhausted(RuntimeError):
    """More (instance, port) pairs ask for a PROXY header than the config has slots for."""


@dataclass(frozen=True, slots=True)
class SlotTarget:
    """What one PROXY slot server points at: the key ``<instance>:<port>`` and its address."""

    key: str
    ip: str
    port: int


@dataclass(frozen=True, slots=True)
class PlaneState:
    """Map contents by map name, and the PROXY slot backends in use."""

    maps: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: {name: {} for name in MAPS}
    )
    slots: Mapping[str, SlotTarget] = field(default_factory=dict)


def _checked(what: str, value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"{what} {value!r}: only [a-z0-9_.:-] can go into an HAProxy map")
    return value


def freshest(table: RoutingTable, app_id: str, now: float, handshake_stale: float) -> str | None:
    """The app's instance with the most recent handshake within ``handshake_stale``."""
    fresh = [
        table.instances[i]
        for i in table.apps.get(app_id, ())
        if (hs := table.instances[i].last_handshake) is not None and now - hs < handshake_stale
    ]
    if not fresh:
        return None
    fresh.sort(key=lambda inst: (-(inst.last_handshake or 0.0), inst.instance_id))
    return fresh[0].instance_id


def desired_state(
    table: RoutingTable,
    now: float,
    *,
    handshake_stale: float = 1800.0,
    custom_domains: Mapping[str, tuple[str, int]] | None = None,
    slots_before: Mapping[str, SlotTarget] | None = None,
    pp_slots: int = 64,
) -> PlaneState:
    """The maps and slots for ``table``; slots keep their target across tables when they can."""
    bases = {_checked("base domain", d): "1" for d in table.base_domains}
    custom = {
        _checked("custom domain", name.lower().rstrip(".")): f"{_checked('app', app)}-{port}s"
        for name, (app, port) in (custom_domains or {}).items()
    }
    instances: dict[str, str] = {}
    wanted: dict[str, tuple[int, str, int]] = {}  # key -> (version, ip, port)
    port_rules: dict[str, str | int] = {}
    for iid, inst in table.instances.items():
        _checked("instance id", iid)
        restrict = "1" if inst.port_policy.restrict else "0"
        instances[iid] = f"{_checked('ip', inst.ip)}|{restrict}|{_checked('app', inst.app_id)}"
        for rule in inst.port_policy.rules:
            key = f"{iid}:{rule.port}"
            port_rules[key] = rule.proxy_protocol
            if rule.proxy_protocol:
                wanted[key] = (rule.proxy_protocol, inst.ip, rule.port)
    apps = {
        app: freshest(table, app, now, handshake_stale) or "-"
        for app in table.apps
        if app not in table.instances  # an instance id wins over an app id, as in the proxy
    }
    slots = _assign_slots(wanted, slots_before or {}, pp_slots)
    slot_of = {target.key: name for name, target in slots.items()}
    ports = {key: slot_of.get(key, "0") for key in port_rules}
    maps = {"bases": bases, "custom": custom, "instances": instances, "apps": apps, "ports": ports}
    return PlaneState(maps=maps, slots=slots)


def _assign_slots(
    wanted: Mapping[str, tuple[int, str, int]], before: Mapping[str, SlotTarget], count: int
) -> dict[str, SlotTarget]:
    slots: dict[str, SlotTarget] = {}
    placed: set[str] = set()
    for name, target in before.items():  # keep live targets where they are
        want = wanted.get(target.key)
        if want is not None and name.startswith(f"pp{want[0]}_"):
            slots[name] = SlotTarget(target.key, want[1], want[2])
            placed.add(target.key)
    for key in sorted(set(wanted) - placed):
        version, ip, port = wanted[key]
        free = next((n for n in slot_names(version, count) if n not in slots), None)
        if free is None:
            raise SlotsExhausted(
                f"{key} needs a PROXY v{version} slot but all {count} are in use: "
                "raise HaproxyConfig.pp_slots and restart the plane"
            )
        slots[free] = SlotTarget(key, ip, port)
    return slots


# Adds in dependency order (an app's instance before the app), deletes in reverse.
_ADD_ORDER = ("bases", "custom", "instances", "ports", "apps")


def diff_commands(paths: RunPaths, old: PlaneState, new: PlaneState) -> list[str]:
    """Runtime-API commands that turn ``old`` into ``new``, touching only what changed."""
    out: list[str] = []
    for name, target in sorted(new.slots.items()):
        if old.slots.get(name) != target:
            out.append(f"set server {name}/s addr {target.ip} port {target.port}")
            if name not in old.slots:
                out.append(f"set server {name}/s state ready")
    for map_name in _ADD_ORDER:
        before, after, path = old.maps.get(map_name, {}), new.maps[map_name], paths.map(map_name)
        for key, value in sorted(after.items()):
            if key not in before:
                out.append(f"add map {path} {key} {value}")
            elif before[key] != value:
                out.append(f"set map {path} {key} {value}")
    for map_name in reversed(_ADD_ORDER):
        before, after, path = old.maps.get(map_name, {}), new.maps[map_name], paths.map(map_name)
        out.extend(f"del map {path} {key}" for key in sorted(set(before) - set(after)))
    for name in sorted(set(old.slots) - set(new.slots)):
        out.append(f"set server {name}/s state maint")
    return out
