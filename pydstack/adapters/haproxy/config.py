"""The HAProxy configuration of the gateway data plane (pure: text in, text out).

One TCP frontend (``fe_main``) waits for the ClientHello (``tcp-request inspect-delay``),
splits ``req.ssl_sni`` with dstack's ``<id>[-<port>][s|g].<base>`` rule into variables and
looks the id up in map files that the runtime API changes live:

========================  ===========================================================
``bases.map``             base domain -> ``1``
``custom.map``            custom domain -> a synthetic label ``<app>-<port>s``
``instances.map``         instance id -> ``<ip>|<restrict 0/1>|<app id>``
``apps.map``              app id -> its freshest instance id, ``-`` when none is fresh
``ports.map``             ``<instance>:<port>`` -> ``0`` or a PROXY slot backend ``ppN_K``
========================  ===========================================================

Every refusal goes to its own empty backend ``rf_<reason>`` (counted by ``show stat``) and
closes without a byte. ``s`` routes are relayed from ``fe_main`` itself (``set-dst`` to the
instance and a ``0.0.0.0:0`` server); other routes hop over a unix socket (PROXY v2, so the
client's addresses survive) to ``fe_term`` / ``fe_h2``, which terminate TLS with a crt-list
(``fe_h2`` offers ALPN h2 only), re-derive the route from ``ssl_fc_sni`` and relay plain
TCP. A PROXY header must carry the client's own destination, which ``set-dst`` would
overwrite, so ports that ask for one are reached through slot backends ``pp1_K``/``pp2_K``
(one ``send-proxy``/``send-proxy-v2`` server each, pointed at the instance with
``set server addr``). Per-app connection limits: a stick table keyed by app id
(``sc0_conn_cur``) against ``proc.app_limit`` (changeable with ``set var``).

Usage::

    text = render_config(HaproxyConfig(port=443), RunPaths.under(run_dir), listen_fd=3)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REFUSALS = (
    "handshake_timeout",
    "malformed_client_hello",
    "no_sni",
    "unknown_domain",
    "bad_route",
    "unknown_id",
    "no_live_instance",
    "port_denied",
    "app_limit",
)
MAPS = ("bases", "custom", "instances", "apps", "ports")


@dataclass(frozen=True, slots=True)
class HaproxyConfig:
    """Listen address and knobs; names and defaults follow ``ProxyConfig`` where they meet."""

    host: str = "127.0.0.1"
    port: int = 8443  # 0: pick a free port (the wrapper binds it and passes the fd)
    handshake_stale: float = 1800.0
    connect_timeout: float = 5.0
    handshake_timeout: float = 5.0  # waiting for the ClientHello (inspect-delay)
    idle_timeout: float = 600.0  # timeout client/server: also bounds the TLS handshake
    max_connections_per_app: int = 2000  # 0: unlimited
    pp_slots: int = 64  # PROXY-protocol targets per header version (instance, port)
    refresh_interval: float = 5.0  # re-pick apps' freshest instances (handshakes age)
    nbthread: int = 0  # 0: HAProxy's default (one per CPU)
    maxconn: int = 0  # 0: HAProxy derives it from the file-descriptor limit
    binary: str = "haproxy"


@dataclass(frozen=True, slots=True)
class RunPaths:
    """Where one HAProxy instance keeps its socket, maps and certificates."""

    root: Path

    @classmethod
    def under(cls, root: Path) -> RunPaths:
        return cls(root)

    @property
    def admin(self) -> Path:
        return self.root / "admin.sock"

    @property
    def config(self) -> Path:
        return self.root / "haproxy.cfg"

    def map(self, name: str) -> Path:
        return self.root / f"{name}.map"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def crt_list(self) -> Path:
        return self.root / "certs.list"

    @property
    def term_sock(self) -> Path:
        return self.root / "term.sock"

    @property
    def h2_sock(self) -> Path:
        return self.root / "h2.sock"


def slot_names(version: int, count: int) -> list[str]:
    return [f"pp{version}_{k}" for k in range(count)]


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _route_rules(paths: RunPaths) -> list[str]:
    """Rules shared by fe_main and the terminating frontends: txn.sni -> target variables."""
    m = {name: paths.map(name) for name in MAPS}
    r = "tcp-request content"
    return [
        f"{r} set-var(txn.custom) var(txn.sni),map_str({m['custom']})",
        f"{r} set-var(txn.label) var(txn.sni),field(1,.)",
        f"{r} set-var(txn.label) var(txn.custom) if custom",
        f"{r} set-var(txn.base) var(txn.sni),regsub('^[^.]*\\.','')",
        f"{r} set-var(txn.id) var(txn.label),field(1,-)",
        f"{r} set-var(txn.suffix) var(txn.label),field(2,-)",
        f"{r} set-var(txn.mode) var(txn.suffix),regsub('[0-9]+','')",
        f"{r} set-var(txn.digits) var(txn.suffix),regsub('[sg]$','')",
        f"{r} set-var(txn.port) var(txn.digits),add(0) if has_digits",
        f"{r} set-var(txn.port) int(443) if !has_digits mode_s",
        f"{r} set-var(txn.port) int(80) if !has_digits !mode_s",
        f"{r} set-var(txn.inst) var(txn.id) if {{ var(txn.id),map_str({m['instances']}) -m found }}",  # noqa: E501 - one HAProxy rule
        f"{r} set-var(txn.inst) var(txn.id),map_str({m['apps']}) if !has_inst",
        f"{r} set-var(txn.info) var(txn.inst),map_str({m['instances']})",
        f"{r} set-var(txn.ip) var(txn.info),field(1,|)",
        f"{r} set-var(txn.app) var(txn.info),field(3,|)",
        f"{r} set-var(txn.pp) var(txn.inst),concat(:,txn.port),map_str({m['ports']})",
    ]


def _acls(paths: RunPaths) -> list[str]:
    return [
        "acl hello req.ssl_hello_type 1",
        "acl has_sni var(txn.sni) -m found",
        "acl custom var(txn.custom) -m found",
        f"acl known_base var(txn.base),map_str({paths.map('bases')}) -m found",
        "acl label_ok var(txn.label) -m reg '^[a-z0-9_]+(-[0-9]{0,9}[sg]?)?$'",
        "acl has_digits var(txn.digits) -m reg '^[0-9]{1,9}$'",
        "acl port_ok var(txn.port) -m int 1:65535",
        "acl has_inst var(txn.inst) -m found",
        "acl no_live var(txn.inst) -m str -- -",
        "acl restricted var(txn.info),field(2,|) -m str 1",
        "acl has_rule var(txn.pp) -m found",
        "acl pp_slot var(txn.pp) -m beg pp",
        "acl mode_s var(txn.mode) -m str s",
        "acl mode_g var(txn.mode) -m str g",
        "acl limited var(proc.app_limit) -m int gt 0",
        "acl over_limit sc0_conn_cur,sub(proc.app_limit) -m int gt 0",
    ]


def _target_rules() -> list[str]:
    r = "tcp-request content"
    return [
        f"{r} set-dst var(txn.ip) if has_inst !pp_slot",
        f"{r} set-dst-port var(txn.port) if has_inst !pp_slot",
    ]


def _refusal_rules() -> list[str]:
    return [
        "use_backend rf_handshake_timeout if !{ req.len gt 0 }",
        "use_backend rf_malformed_client_hello if !hello",
        "use_backend rf_no_sni if !has_sni",
        "use_backend rf_unknown_domain if !known_base !custom",
        "use_backend rf_bad_route if !label_ok or !port_ok",
        "use_backend rf_unknown_id if !has_inst",
        "use_backend rf_no_live_instance if no_live",
        "use_backend rf_unknown_id if !{ var(txn.info) -m found }",
        "use_backend rf_port_denied if restricted !has_rule",
        "use_backend rf_app_limit if limited over_limit",
    ]


def render_config(cfg: HaproxyConfig, paths: RunPaths, *, listen_fd: int | None = None) -> str:
    """The whole configuration; ``listen_fd``: an inherited listening socket to serve on."""
    bind = f"fd@{listen_fd}" if listen_fd is not None else f"{cfg.host}:{cfg.port}"
    if ":" in cfg.host and listen_fd is None:
        bind = f"[{cfg.host}]:{cfg.port}"
    r = "tcp-request content"
    lines = [
        "# generated by pydstack.adapters.haproxy: do not edit, the gateway rewrites it",
        "global",
        f"    stats socket {paths.admin} mode 600 level admin",
        "    stats timeout 1m",
        *([f"    maxconn {cfg.maxconn}"] if cfg.maxconn else []),
        *([f"    nbthread {cfg.nbthread}"] if cfg.nbthread else []),
        f"    set-var proc.app_limit int({cfg.max_connections_per_app})",
        "    tune.ssl.default-dh-param 2048",
        "",
        "defaults",
        "    mode tcp",
        f"    timeout connect {_ms(cfg.connect_timeout)}",
        f"    timeout client {_ms(cfg.idle_timeout)}",
        f"    timeout server {_ms(cfg.idle_timeout)}",
        "    retries 0",
        "",
        "frontend fe_main",
        f"    bind {bind}",
        f"    tcp-request inspect-delay {_ms(cfg.handshake_timeout)}",
        *(f"    {a}" for a in _acls(paths)),
        "    # waits until the ClientHello is complete, or is not one, or time is up",
        f"    {r} set-var(txn.sni) req.ssl_sni,lower if {{ req.ssl_sni -m found }}",
        *(f"    {x}" for x in _route_rules(paths)),
        f"    {r} track-sc0 var(txn.app) table st_app if has_inst limited",
        *(f"    {x}" for x in _target_rules()),
        *(f"    {x}" for x in _refusal_rules()),
        "    use_backend be_to_h2 if mode_g",
        "    use_backend be_to_term if !mode_s",
        "    use_backend %[var(txn.pp)] if pp_slot",
        "    default_backend be_pass",
        "",
    ]
    terminating = (("fe_term", paths.term_sock, ""), ("fe_h2", paths.h2_sock, " alpn h2"))
    for name, sock, alpn in terminating:
        lines += [
            f"frontend {name}",
            f"    bind unix@{sock} mode 600 accept-proxy ssl crt-list {paths.crt_list}"
            f" strict-sni{alpn}",
            *(f"    {a}" for a in _acls(paths)),
            f"    {r} set-var(txn.sni) ssl_fc_sni,lower",
            *(f"    {x}" for x in _route_rules(paths)),
            *(f"    {x}" for x in _target_rules()),
            "    # the table may have changed since fe_main routed: never dial our own address",
            f"    {r} reject if !has_inst or no_live or !{{ var(txn.info) -m found }}",
            f"    {r} reject if restricted !has_rule",
            "    use_backend %[var(txn.pp)] if pp_slot",
            "    default_backend be_direct",
            "",
        ]
    lines += [
        "backend st_app",
        "    stick-table type string len 64 size 1m store conn_cur",
        "",
        "backend be_pass",
        "    server s 0.0.0.0:0",
        "",
        "backend be_direct",
        "    server s 0.0.0.0:0",
        "",
        "backend be_to_term",
        f"    server s unix@{paths.term_sock} send-proxy-v2",
        "",
        "backend be_to_h2",
        f"    server s unix@{paths.h2_sock} send-proxy-v2",
        "",
    ]
    for version, option in ((1, "send-proxy"), (2, "send-proxy-v2")):
        for name in slot_names(version, cfg.pp_slots):
            lines += [f"backend {name}", f"    server s 127.0.0.1:1 {option} disabled", ""]
    for reason in REFUSALS:
        lines += [f"backend rf_{reason}", f"    {r} reject", ""]
    return "\n".join(lines)
