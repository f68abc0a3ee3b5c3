"""The KMS RPC over HTTPS: dstack's prpc paths `/prpc/KMS.<Method>` with JSON bodies.

Bytes are hex in JSON (as dstack's prpc serde). Refusals with nothing appended (`refusal.py`,
each counted and logged): a malformed body is 400 naming the field; a field over its bound
(vm_config, attestation) 413 naming it; evidence that does not verify 403; evidence that cannot
be checked now (collateral unavailable) 503; a method that needs evidence and got no client
certificate 401. Each answers `{"error", "refused": kind, "field"}`. A refusal decided on the
log (the policy's or the backend's, for evidence that verified) is 403 with the reason and the
request id. The server asks for a client certificate (issued under the cluster's temp CA) but
does not require one, so `GetTempCaCert`, `GetMeta` and `GetAppEnvEncryptPubKey` work without.

    async with serve_kms(svc, "127.0.0.1", 0) as url: ...
"""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import nats.errors
import structlog
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.adapters.nats import StoreError
from pydstack.adapters.tdx.attestation import Attestation, decode_attestation, encode_attestation
from pydstack.adapters.tdx.errors import TdxError
from pydstack.adapters.tdx.eventlog import EventLogError, parse_json_event_log, runtime_events_of
from pydstack.adapters.tdx.quote import parse_quote
from pydstack.adapters.tdx.ratls import RCGEN_NOT_AFTER, RCGEN_NOT_BEFORE, build_ratls_cert
from pydstack.adapters.tdx.ratls_tls import peer_cert_der, server_ssl_context
from pydstack.core.kms import CsrError, decode_csr
from pydstack.core.kms.csr import Csr
from pydstack.core.kms.csr_v1 import decode_csr_v1, encode_csr_v1
from pydstack.core.kms.onboarding import MAX_TOKEN

from .backends import chain_meta
from .certgrants import usage_of
from .evidence import MALFORMED, MAX_CERTIFICATE, OVERSIZE
from .refusal import NO_CERTIFICATE, Refused, refuse
from .service import Denied, KmsService, pem

log = structlog.get_logger("pydstack.kms")

SERVICE: web.AppKey[KmsService] = web.AppKey("kms", KmsService)
# Connections the kernel queues per listening socket before one is accepted: a boot storm's
# CVMs connect at once (aiohttp's default, 128, drops SYNs and stalls them a second or more).
BACKLOG = 1024
SIGN_CERT_VERSIONS = (1, 2)  # dstack v0.5.11 `sign_cert`: V1 (pre-0.5 guests), V2
Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


class BadRequest(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _str(body: dict[str, Any], name: str, default: str = "") -> str:
    v = body.get(name, default)
    if not isinstance(v, str):
        raise BadRequest(name, f"field {name} must be a string")
    return v


def _int(body: dict[str, Any], name: str, default: int = 0) -> int:
    v = body.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise BadRequest(name, f"field {name} must be a non-negative integer")
    return v


def _bytes(body: dict[str, Any], name: str) -> bytes:
    """Hex (optionally 0x-prefixed), else base64, as dstack accepts."""
    v = _str(body, name)
    try:
        return bytes.fromhex(v.removeprefix("0x"))
    except ValueError:
        pass
    try:
        return base64.b64decode(v, validate=True)
    except ValueError:
        raise BadRequest(name, f"field {name} must be hex or base64") from None


def _denied(d: Denied) -> web.Response:
    return web.json_response({"error": d.reason, "request_id": d.request_id}, status=403)


def _refused(r: Refused) -> web.Response:
    return web.json_response(
        {"error": r.reason, "refused": r.kind, "field": r.field}, status=r.status
    )


def _peer(request: web.Request, method: str) -> bytes:
    der = peer_cert_der(request.transport)
    if der is None:
        raise refuse(method, NO_CERTIFICATE, "this method needs an RA-TLS client certificate")
    return der


async def get_app_key(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    if _int(body, "api_version") > 1:
        raise BadRequest("api_version", f"unsupported api_version {body['api_version']}")
    vm_config = _str(body, "vm_config")
    try:
        der = _peer(request, "GetAppKey")
        return web.json_response(await request.app[SERVICE].get_app_key(der, vm_config))
    except Denied as d:
        return _denied(d)


async def get_kms_key(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    vm_config = _str(body, "vm_config")
    # Ours, beside dstack's fields: the source's onboarding token (authority.py), sent only
    # inside the mutual RA-TLS channel; never logged, never on the log.
    token = _str(body, "onboard_token")
    if len(token) > MAX_TOKEN:
        raise BadRequest("onboard_token", f"onboard_token is over {MAX_TOKEN} characters")
    try:
        der = _peer(request, "GetKmsKey")
        return web.json_response(await request.app[SERVICE].get_kms_key(der, vm_config, token))
    except Denied as d:
        return _denied(d)


async def env_pubkey(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    app_id = _bytes(body, "app_id")
    if len(app_id) != 20:
        raise BadRequest("app_id", f"app_id must be 20 bytes, got {len(app_id)}")
    return web.json_response(request.app[SERVICE].env_pubkey(app_id))


async def get_meta(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    svc = request.app[SERVICE]
    return web.json_response(svc.meta() | await chain_meta(svc.backend))


async def get_temp_ca(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    return web.json_response(request.app[SERVICE].temp_ca())


def _legacy_attestation(quote: bytes, event_log: bytes) -> bytes:
    """dstack `Attestation::from_tdx_quote`: a V1 CSR's quote and JSON event log as the SCALE
    V0 attestation a V2 request carries (report_data: the quote's own)."""
    try:
        events = parse_json_event_log(event_log)
        report_data = parse_quote(quote).report.report_data
        att = Attestation(quote, tuple(events), tuple(runtime_events_of(events)), report_data)
        return encode_attestation(att)
    except (TdxError, EventLogError, ValueError) as e:
        raise BadRequest("csr", f"csr quote or event_log: {e}") from None


def _csr_of(version: int, raw: bytes) -> tuple[Csr, bytes, bytes]:
    """(the CSR as V2, its SCALE V0 attestation, the bytes its signature covers)."""
    if version == 2:
        csr, att_raw = decode_csr(raw)
        return csr, att_raw, raw
    csr, quote, event_log = decode_csr_v1(raw)
    return csr, _legacy_attestation(quote, event_log), encode_csr_v1(csr, quote, event_log)


async def sign_cert(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    svc = request.app[SERVICE]
    version = _int(body, "api_version")
    if version not in SIGN_CERT_VERSIONS:  # as dstack: 1 upgraded to 2, nothing else
        raise BadRequest("api_version", f"unsupported api_version {version}: SignCert takes "
                         "1 (CertSigningRequestV1) or 2 (CertSigningRequestV2)")  # fmt: skip
    raw, sig, vm_config = _bytes(body, "csr"), _bytes(body, "signature"), _str(body, "vm_config")
    if len(raw) > MAX_CERTIFICATE:
        raise refuse("SignCert", OVERSIZE, f"csr is {len(raw)} bytes, over {MAX_CERTIFICATE}",
                     field="csr")  # fmt: skip
    try:
        csr, att_raw, signed = _csr_of(version, raw)
        pub = serialization.load_der_public_key(csr.pubkey)
    except (CsrError, ValueError) as e:
        raise BadRequest("csr", f"csr: {e}") from None
    if csr.confirm != "please sign cert:":
        raise BadRequest("csr", "csr confirm word must be 'please sign cert:'")
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise BadRequest("csr", "csr public key must be ECDSA P-256")
    try:
        pub.verify(sig, signed, ec.ECDSA(hashes.SHA256()))
    except Exception:
        raise BadRequest("signature", "csr signature does not verify") from None
    c = csr.config
    now = int(svc.clock())
    usage = usage_of(c.usage_server_auth, c.usage_client_auth)
    try:
        _, issued, ev = await svc.decide_csr(att_raw, csr.pubkey, vm_config, now, usage)
    except Denied as d:
        return _denied(d)
    app_id = bytes.fromhex(issued.boot_info.app_id)
    ca_cert, ca_key = svc.app_ca(app_id)
    # dstack `CaCert::sign_csr`: the CSR's attestation (verified, bound to this key) when it
    # asks for ext_quote, the AppInfo of that attestation when it asks for ext_app_info.
    att = decode_attestation(att_raw) if c.ext_quote else None
    # build_ratls_cert only reads key.public_key() when an issuer signs: a public key will do.
    cert = build_ratls_cert(
        cast(ec.EllipticCurvePrivateKey, _PublicOnly(pub)),
        att,
        subject=c.subject,
        org_name=c.org_name,
        alt_names=c.subject_alt_names,
        issuer=(ca_cert, ca_key),
        usage_server_auth=c.usage_server_auth,
        usage_client_auth=c.usage_client_auth,
        app_id=app_id,
        app_info=ev.app_info if c.ext_app_info else None,
        special_usage="app:custom",
        # what the request names, else rcgen's defaults as dstack's `sign_csr` (1975..4096)
        not_before=RCGEN_NOT_BEFORE if c.not_before is None else c.not_before,
        not_after=RCGEN_NOT_AFTER if c.not_after is None else c.not_after,
    )
    chain = [pem(cert), pem(ca_cert), svc.created.ca_cert_pem]
    return web.json_response({"certificate_chain": chain})


class _PublicOnly:
    def __init__(self, pub: ec.EllipticCurvePublicKey) -> None:
        self._pub = pub

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._pub


KEY_METHODS = frozenset({"GetAppKey", "GetKmsKey", "SignCert"})  # refusals counted
METHODS: dict[str, Handler] = {
    "GetAppKey": get_app_key,
    "GetKmsKey": get_kms_key,
    "GetAppEnvEncryptPubKey": env_pubkey,
    "GetMeta": get_meta,
    "GetTempCaCert": get_temp_ca,
    "SignCert": sign_cert,
}


async def dispatch(request: web.Request) -> web.StreamResponse:
    method = request.match_info["method"].removeprefix("KMS.")
    handler = METHODS.get(method)
    if handler is None:
        return web.json_response({"error": f"unknown method {method}"}, status=404)
    if method not in KEY_METHODS:
        return await _handle(request, handler, method)
    # A key request's refusal log line names the peer; nothing else about it is trusted yet.
    with structlog.contextvars.bound_contextvars(peer=request.remote or ""):
        try:
            return await _handle(request, handler, method)
        except Refused as r:
            return _refused(r)


async def _handle(request: web.Request, handler: Handler, method: str) -> web.StreamResponse:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        if method in KEY_METHODS:
            refuse(method, OVERSIZE, "request body over the KMS's 1 MiB limit")
        raise
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError) as e:
        return _bad(method, BadRequest("", f"body is not JSON: {e}"))
    if body is None:  # dstack's prpc client sends `google.protobuf.Empty` (prost's `()`) as null
        body = {}
    if not isinstance(body, dict):
        return _bad(method, BadRequest("", "body must be a JSON object"))
    try:
        return await handler(request, body)
    except BadRequest as e:
        return _bad(method, e)
    except (StoreError, nats.errors.Error, TimeoutError) as e:
        # The log did not take the request or its decision (e.g. the stream had no leader
        # during an election): nothing is decided, nothing released; the caller retries.
        log.warning("the log is unavailable; request not decided", method=method,
                    error=str(e) or type(e).__name__)  # fmt: skip
        return web.json_response(
            {"error": f"the KMS's log is unavailable ({str(e) or type(e).__name__}); retry"},
            status=503,
        )


def _bad(method: str, e: BadRequest) -> web.Response:
    """400 naming the field; for a key request also a counted, logged refusal."""
    if method not in KEY_METHODS:
        return web.json_response({"error": str(e), "field": e.field}, status=400)
    r = refuse(method, MALFORMED, str(e), field=e.field)
    return web.json_response({"error": r.reason, "refused": r.kind, "field": r.field}, status=400)


def make_app(svc: KmsService) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app[SERVICE] = svc
    app.router.add_route("*", "/prpc/{method}", dispatch)
    return app


async def server_context(svc: KmsService) -> ssl.SSLContext:
    chain, key = await svc.rpc_identity()
    return rpc_ssl_context(chain, key, svc.temp_cert_pem)


def rpc_ssl_context(chain_pem: str, key_pem: str, temp_ca_pem: str) -> ssl.SSLContext:
    """The KMS RPC's TLS settings: its certificate, client certificates under the temp CA."""
    ctx = server_ssl_context(chain_pem, key_pem, temp_ca_pem)
    ctx.verify_mode = ssl.CERT_OPTIONAL  # public methods need no client certificate
    # No TLS 1.3 session tickets: every client is a fresh CVM that never resumes, and issuing
    # the two default tickets costs ~0.5 ms of CPU per handshake plus a write.
    ctx.num_tickets = 0
    return ctx


@contextlib.asynccontextmanager
async def serve_kms(
    svc: KmsService, host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False
) -> AsyncIterator[str]:
    """Serve the KMS RPC over TLS; yields its base URL (`https://host:port`). `reuse_port`:
    `SO_REUSEPORT`, so the other workers of this KMS listen on the same port (`workers`)."""
    runner = web.AppRunner(make_app(svc), access_log=None)
    await runner.setup()
    site = web.TCPSite(
        runner,
        host,
        port,
        ssl_context=await server_context(svc),
        reuse_port=reuse_port or None,
        backlog=BACKLOG,
    )
    await site.start()
    server = site._server  # aiohttp keeps the bound socket here; port 0 needs the real one
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    try:
        yield f"https://{host}:{bound}"
    finally:
        await runner.cleanup()


def ca_of(pem_text: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem_text.encode())
