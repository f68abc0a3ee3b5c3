"""``RegisterCvm`` (dstack's JSON shape) behind mutual RA-TLS, at ``/prpc/RegisterCvm``
(what v0.5.11's guest calls), ``/prpc/Tproxy.RegisterCvm`` (older guests) and
``/prpc/Gateway.RegisterCvm``.

The caller's identity is its client certificate: TLS checks the chain to the KMS root CA
(never the KMS temp CA, whose key is public). A certificate with a quote has its quote and
event log checked now (`_admit`; 403 for anything without valid evidence; such junk is not
written to the log); one without a quote is admitted on the AppInfo the KMS wrote into it
at ``SignCert`` (dstack v0.5.11's guest asks ``ext_app_info`` only), or answered 403 "no
attestation provided" (then dstack's guest retries with its quote certificate). Either way
the chain must be the KMS's ``SignCert`` chain for that app (leaf, that app's CA, root:
`client_chain.py`; else 403 ``not_app_certificate``, nothing appended), and the app id,
instance id and compose hash come from the attested event log (or the KMS's statement of
it), never from the request.
Then the optional authorization webhook (POST of dstack's AppInfo JSON, `webhook_body`; any
2xx allows, like dstack), then the cluster decision and its atomic commit (``Registrar``).
Refusals of an attested caller are answered with a 4xx JSON ``{"error", "code"}`` and recorded as
``CvmRegistrationRefused``, except claims on someone else's ids (``UNRECORDED``: 403,
nothing appended)::

    app = registration_app(registrar, verifier, RegistrationConfig(node_id="gw1"))
    ssl = server_ssl_context(chain_pem, key_pem, ca_pem)   # mutual: clients must present one
    await web.TCPSite(runner, host, 8011, ssl_context=ssl).start()

Request: ``{"client_public_key": "<wg base64>", "port_policy": {"ports": [{"port": 443,
"pp": false}], "restrict_mode": false}}`` (``port_policy`` optional). Response: ``{"wg":
{"client_ip", "servers": [{"pk", "ip", "endpoint"}]}, "agent": {...}, "gateways": [...]}``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import msgspec
import structlog
from aiohttp import web
from cryptography import x509

from pydstack.actors.kms.log_backend import allowed_on_log
from pydstack.adapters.nats import StoreError
from pydstack.adapters.tdx.attestation import encode_attestation
from pydstack.adapters.tdx.identity import AppInfo
from pydstack.adapters.tdx.ratls import RaTlsError, app_info_of, has_attestation
from pydstack.adapters.tdx.ratls_tls import RaTlsVerifier, peer_cert_der, peer_chain_der
from pydstack.core.events import PortAttrs
from pydstack.core.gateway.cluster import (
    Admission,
    ClusterState,
    RefusalCode,
    Refused,
    RegisterRequest,
)
from pydstack.core.gateway.ports import DeclaredPorts

from .client_chain import AppChainCheck
from .registrar import Registrar

_log = structlog.get_logger("pydstack.gateway.registration")

PATH: Final = "/prpc/Gateway.RegisterCvm"
# where dstack's guests call it: v0.5.11's prpc client names no service (`RegisterCvm`), older
# ones the legacy `Tproxy.` service (dstack's gateway mounts prpc with `trim: "Tproxy."`)
PATHS: Final = ("/prpc/RegisterCvm", "/prpc/Tproxy.RegisterCvm", PATH)
# dstack v0.5.11's guest retries with its quote-carrying certificate when the error says this
NO_ATTESTATION: Final = "no attestation provided"
STATUS: Final[dict[str, int]] = {
    "bad_request": 400,
    "bad_key": 400,
    "unauthorized": 403,
    "key_in_use": 409,
    "app_mismatch": 409,
    "pool_exhausted": 503,
    "node_down": 503,
    "id_in_use": 403,
    "not_same_instance": 403,
}
# refused without a CvmRegistrationRefused: the instance subject they name is someone else's
# (a victim's instance or app id), and a record there is the attacker's to write
UNRECORDED: Final = frozenset({"id_in_use", "not_same_instance"})
# refused before any decision, nothing appended: the client certificate is not the KMS's
# SignCert certificate for the attested app (temp CA, another app's, no app CA)
NOT_APP_CERT: Final = "not_app_certificate"


@dataclass(frozen=True, slots=True)
class RegistrationConfig:
    node_id: str | None = None
    auth_webhook: str | None = None  # dstack core.auth.url; None = every attested app allowed
    # the KMS's log backend: admit only a compose hash the app's own events on the log name
    log_auth: bool = False
    auth_timeout_s: float = 5.0
    agent_port: int = 8090  # dstack proxy.agent_port (the guest agent inside the CVM)
    external_port: int = 443
    app_address_ns_prefix: str = "_dstack-app-address"
    # admit only quote-carrying certificates: a KMS-signed app-info certificate (the KMS
    # checked the quote when it signed) is answered "no attestation provided", and dstack's
    # guest retries with its quote certificate
    require_quote: bool = False


class _PortAttrsIn(msgspec.Struct, forbid_unknown_fields=True):
    port: int
    pp: bool = False


class _PortPolicyIn(msgspec.Struct, forbid_unknown_fields=True):
    ports: list[_PortAttrsIn] = []
    restrict_mode: bool = False


class _RegisterIn(msgspec.Struct, forbid_unknown_fields=True):
    client_public_key: str
    port_policy: _PortPolicyIn | None = None


_DECODER: Final = msgspec.json.Decoder(_RegisterIn)


def response_body(state: ClusterState, admission: Admission, cfg: RegistrationConfig) -> Any:
    """dstack's RegisterCvmResponse for an admission, every up node as a WireGuard peer."""
    nodes = [state.nodes[k] for k in sorted(state.nodes)]
    up = [n for n in nodes if n.up]
    domain = next((n.base_domain for n in up if n.node_id == cfg.node_id), "")
    domain = domain or next((n.base_domain for n in up if n.base_domain), "")
    return {
        "wg": {
            "client_ip": admission.tunnel_ip,
            "servers": [
                {"pk": n.wg_public_key, "ip": n.tunnel_ip, "endpoint": n.endpoint} for n in up
            ],
        },
        "agent": {
            "external_port": cfg.external_port,
            "internal_port": cfg.agent_port,
            "domain": domain,
            "app_address_ns_prefix": cfg.app_address_ns_prefix,
        },
        "gateways": [
            {
                "id": i,  # dstack numbers its nodes; ours are named (node_id, uuid below)
                "uuid": n.node_id.encode().hex(),
                "node_id": n.node_id,
                "url": n.url,
                "last_seen": 0,
                "wg_public_key": n.wg_public_key,
                "wg_ip": n.tunnel_ip,
                "wg_endpoint": n.endpoint,
            }
            for i, n in enumerate(up, 1)
        ],
    }


def webhook_body(info: AppInfo) -> dict[str, str]:
    """The auth webhook's body as dstack v0.5.11's gateway posts it: serde of its `AppInfo`
    (`dstack-attest`: these fields in this order, snake_case, every one lower-case hex without
    0x, `key_provider_info` included)."""
    return {
        "app_id": info.app_id.hex(),
        "compose_hash": info.compose_hash.hex(),
        "instance_id": info.instance_id.hex(),
        "device_id": info.device_id.hex(),
        "mr_system": info.mr_system.hex(),
        "mr_aggregated": info.mr_aggregated.hex(),
        "os_image_hash": info.os_image_hash.hex(),
        "key_provider_info": info.key_provider_info.hex(),
    }


async def _authorized(
    session: aiohttp.ClientSession, cfg: RegistrationConfig, app_info: dict[str, str]
) -> str | None:
    """None when the webhook allows the app, else why not (fail closed on any error)."""
    assert cfg.auth_webhook is not None
    try:
        timeout = aiohttp.ClientTimeout(total=cfg.auth_timeout_s)
        async with session.post(cfg.auth_webhook, json=app_info, timeout=timeout) as resp:
            if 200 <= resp.status < 300:
                return None
            return f"authorization webhook answered {resp.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"authorization webhook failed: {type(exc).__name__}: {exc}"


async def _with_upgrade(registrar: Registrar, req: RegisterRequest) -> RegisterRequest:
    """``req`` marked ``compose_on_log`` when its instance holds a lease under another compose
    and the app's own events on the log allow the new one (an upgrade of that instance)."""
    await registrar.ledger.catch_up()
    lease = registrar.state.leases.get(req.instance_id)
    if lease is None or not lease.compose_hash or lease.compose_hash == req.compose_hash:
        return req
    allowed = await allowed_on_log(registrar.store, req.app_id)
    return msgspec.structs.replace(req, compose_on_log=req.compose_hash in allowed)


def _refuse(error: str, code: str, reasons: tuple[str, ...] = ()) -> web.Response:
    body: dict[str, Any] = {"error": error, "code": code}
    if reasons:
        body["reasons"] = list(reasons)
    return web.json_response(body, status=403)


async def _admit(
    request: web.Request,
    verifier: RaTlsVerifier,
    client_chain: AppChainCheck | None,
    require_quote: bool,
) -> tuple[AppInfo, str] | web.Response:
    """(the caller's AppInfo, hash of what vouches for it), or the 403 refusing it; nothing
    is appended for any of these.

    A certificate with a quote: its evidence, checked now (`verifier`), names the app. One
    without (dstack v0.5.11's guest asks SignCert for `ext_app_info` only): the AppInfo the
    KMS wrote into it when it checked the CSR's quote, admitted only from a KMS SignCert
    chain for that app (`client_chain`); else "no attestation provided", and dstack's guest
    retries with its quote certificate."""
    der = peer_cert_der(request.transport)
    if der is None:
        return _refuse("RA-TLS client certificate required", "no_certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
        quoted = has_attestation(cert)
        stated = None if quoted else app_info_of(cert)
    except (ValueError, RaTlsError) as e:
        return _refuse(f"client certificate: {e}", "bad_certificate")
    if quoted:
        peer = await verifier.verify_der(der)
        if not peer.ok:
            return _refuse("RA-TLS peer refused", "bad_evidence", peer.reasons)
        if peer.app_info is None or peer.attestation is None:
            return _refuse("attestation carries no app info", "bad_evidence")
        info = peer.app_info
        att_hash = hashlib.sha256(encode_attestation(peer.attestation)).hexdigest()
    elif stated is None or client_chain is None or require_quote:
        why = "the client certificate carries no RA-TLS quote"
        if stated is not None:
            why += " (its KMS-signed app info is not admitted here)"
        return _refuse(f"{NO_ATTESTATION}: {why}", "no_attestation",
                       ("certificate has no RA-TLS attestation extension",))  # fmt: skip
    else:
        info, att_hash = stated, hashlib.sha256(der).hexdigest()
    if client_chain is not None:
        wrong = client_chain.reason(peer_chain_der(request.transport), info.app_id)
        if wrong is not None:
            _log.info("registration refused", app_id=info.app_id.hex(),
                      instance_id=info.instance_id.hex(), code=NOT_APP_CERT,
                      reason=wrong, recorded=False)  # fmt: skip
            return _refuse(wrong, NOT_APP_CERT)
    return info, att_hash


PeerApplied = Callable[[str], Awaitable[bool]]


def registration_app(
    registrar: Registrar,
    verifier: RaTlsVerifier,
    config: RegistrationConfig | None = None,
    *,
    peer_applied: PeerApplied | None = None,
    client_chain: AppChainCheck | None = None,
) -> web.Application:
    """The RegisterCvm endpoint; serve it with ``server_ssl_context`` (mutual TLS).

    ``peer_applied(public_key)``: this node's wait until its WireGuard device holds the new
    peer; the answer waits for it (bounded), so the CVM's first handshake succeeds.
    ``client_chain``: the client certificate must be the KMS's ``SignCert`` certificate for
    the attested app (`client_chain.py`; a node always sets it, tests of other rules may
    not); else 403 ``not_app_certificate``, nothing appended."""
    cfg = config or RegistrationConfig()
    app = web.Application()
    session_key = web.AppKey("webhook_session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application) -> Any:
        app[session_key] = aiohttp.ClientSession()
        yield
        await app[session_key].close()

    if cfg.auth_webhook is not None:
        app.cleanup_ctx.append(session_ctx)

    async def refuse(req: RegisterRequest, code: RefusalCode, reason: str) -> web.Response:
        refusal = Refused(code=code, reason=reason)
        recorded = code not in UNRECORDED and await registrar.refused(req, refusal)
        _log.info("registration refused", instance_id=req.instance_id, app_id=req.app_id,
                  code=code, reason=reason, recorded=recorded)  # fmt: skip
        return web.json_response({"error": reason, "code": code}, status=STATUS[code])

    async def register_cvm(request: web.Request) -> web.Response:
        admitted = await _admit(request, verifier, client_chain, cfg.require_quote)
        if isinstance(admitted, web.Response):
            return admitted
        info, att_hash = admitted
        req = RegisterRequest(
            app_id=info.app_id.hex(),
            instance_id=info.instance_id.hex(),
            compose_hash=info.compose_hash.hex(),
            wg_public_key="",
            attestation_hash=att_hash,
            mr_system=info.mr_system.hex(),
        )
        try:
            body = _DECODER.decode(await request.read())
        except msgspec.ValidationError as exc:
            return await refuse(req, "bad_request", f"request body: {exc}")
        except msgspec.DecodeError:
            return await refuse(req, "bad_request", "request body is not JSON")
        req = msgspec.structs.replace(req, wg_public_key=body.client_public_key)
        if body.port_policy is not None:
            bad = [p.port for p in body.port_policy.ports if not 0 < p.port < 65536]
            if bad:
                return await refuse(req, "bad_request", f"port {bad[0]} is not in 1-65535")
            ports = [PortAttrs(port=p.port, pp=p.pp) for p in body.port_policy.ports]
            req = msgspec.structs.replace(
                req, port_policy=DeclaredPorts.of(body.port_policy.restrict_mode, ports)
            )
        try:
            req = await _with_upgrade(registrar, req)
            on_log = await allowed_on_log(registrar.store, req.app_id) if cfg.log_auth else None
        except StoreError as exc:
            return web.json_response({"error": str(exc), "code": "busy"}, status=503)
        if on_log is not None and req.compose_hash not in on_log:
            why = f"compose hash {req.compose_hash} is not named by app {req.app_id}'s events"
            return await refuse(req, "unauthorized", why)
        if cfg.auth_webhook is not None:
            denied = await _authorized(request.app[session_key], cfg, webhook_body(info))
            if denied is not None:
                return await refuse(req, "unauthorized", denied)
        try:
            out = await registrar.register(req)
        except StoreError as exc:  # Contended included: nothing decided, the CVM retries
            _log.warning("registration not decided", instance_id=req.instance_id, error=str(exc))
            return web.json_response({"error": str(exc), "code": "busy"}, status=503)
        if isinstance(out, Refused):
            return await refuse(req, out.code, out.reason)
        if peer_applied is not None and not await peer_applied(out.record.wg_public_key):
            _log.warning("answering before this node holds the peer; the CVM's first "
                         "handshake may be retried", instance_id=req.instance_id)  # fmt: skip
        return web.json_response(response_body(registrar.state, out, cfg))

    for path in PATHS:
        app.router.add_post(path, register_cvm)
    return app


async def serve_registration(
    app: web.Application, host: str, port: int, ssl_context: Any
) -> web.AppRunner:
    """Start ``app`` on ``host:port`` with TLS; the caller owns (and cleans up) the runner."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    return runner
