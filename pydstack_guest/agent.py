"""The guest agent's behaviour, without HTTP: what each dstack RPC answers.

`GuestAgent` owns a `TdxBackend` (configfs on TDX, the simulator elsewhere) and app keys from
a `KeyProvider`. Backend calls block (configfs writes, sysfs reads), so they run in a worker
thread; the backend's own lock keeps every returned quote consistent with its event log,
even while `emit_event` runs concurrently.

    agent = await GuestAgent.create(backend, LocalKeyProvider(path), GuestConfig(...))
    resp = await agent.get_quote(b"nonce")      # {"quote": hex, "event_log": json, ...}
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from Crypto.Hash import keccak
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.adapters.tdx.attestation import Attestation, encode_attestation
from pydstack.adapters.tdx.backend import TdxBackend
from pydstack.adapters.tdx.eventlog import (
    TdxEvent,
    dump_json_event_log,
    event_to_json_obj,
    runtime_events_of,
)
from pydstack.adapters.tdx.identity import AppInfo, decode_app_info, measurements_of
from pydstack.adapters.tdx.quote import parse_quote
from pydstack.adapters.tdx.ratls import (
    RCGEN_NOT_AFTER,
    RCGEN_NOT_BEFORE,
    build_ratls_cert,
    ratls_report_data,
)
from pydstack.core.kms import CertConfig

from . import keys as k
from . import rtmr3
from .cert_client import request_certificate
from .provider import AppKeys, KeyProvider, KeyProviderError

AGENT_VERSION = "0.5.7"  # the dstack guest API level served (SDKs gate features on it)
AGENT_REV = "pydstack-guest"

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A caller mistake; answered with HTTP 400 naming `field`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class GuestConfig(msgspec.Struct, frozen=True):
    app_name: str = ""
    app_compose: str = "{}"
    vm_config: str = "{}"  # JSON: os_image_hash, cpu_count, ...
    sys_config: str = ""  # JSON carried in attestations; built from vm_config when empty
    public_tcbinfo: bool = True


def _hash_report_data(algorithm: str, tag: str, data: bytes) -> bytes:
    """dstack `to_report_data_with_hash`: hash(tag ":" data) zero-padded, or raw 64 bytes."""
    algo = algorithm or "sha512"
    if algo == "raw":
        if len(data) != 64:
            raise RequestError("report_data", f"raw report_data must be 64 bytes, got {len(data)}")
        return data
    content = tag.encode() + b":" + data
    if algo.startswith("keccak") and algo[6:] in ("256", "384", "512"):
        digest = keccak.new(digest_bits=int(algo[6:]), data=content).digest()
    elif algo in ("sha256", "sha384", "sha512", "sha3-256", "sha3-384", "sha3-512"):
        digest = hashlib.new(algo.replace("-", "_"), content).digest()
    else:
        raise RequestError("hash_algorithm", f"invalid hash algorithm {algorithm!r}")
    return digest.ljust(64, b"\x00")


def pad_report_data(data: bytes) -> bytes:
    if len(data) > 64:
        raise RequestError("report_data", f"report_data is at most 64 bytes, got {len(data)}")
    return data.ljust(64, b"\x00")


class GuestAgent:
    def __init__(
        self,
        backend: TdxBackend,
        keys: AppKeys,
        config: GuestConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.keys = keys
        self.config = config
        self.clock = clock
        self.sys_config = config.sys_config or json.dumps({"vm_config": config.vm_config})
        self._app_cert = ""
        self._app_cert_lock = asyncio.Lock()

    @classmethod
    async def create(
        cls, backend: TdxBackend, provider: KeyProvider, config: GuestConfig
    ) -> GuestAgent:
        return cls(backend, await provider.app_keys(), config)

    # --- evidence ---------------------------------------------------------------------

    async def attestation(self, report_data: bytes) -> Attestation:
        data = pad_report_data(report_data)
        quote, log = await asyncio.to_thread(self.backend.attest, data)
        return Attestation(
            quote=quote,
            event_log=tuple(log),
            runtime_events=tuple(runtime_events_of(log)),
            report_data=data,
            config=self.sys_config,
        )

    async def attest(self, report_data: bytes) -> Attestation:
        """`ratls.Attester`: lets `issue_ratls_cert` quote through this agent."""
        return await self.attestation(report_data)

    def app_info(self, att: Attestation) -> AppInfo:
        report = parse_quote(att.quote).report
        # Unverified evidence: dstack reports device_id = sha256(b"") here as well.
        return decode_app_info(measurements_of(report), att.runtime_events, config=self.sys_config)

    async def get_quote(self, report_data: bytes) -> dict[str, Any]:
        att = await self.attestation(report_data)
        return {
            "quote": att.quote.hex(),
            "event_log": dump_json_event_log(att.event_log),
            "report_data": att.report_data.hex(),
            "vm_config": self.config.vm_config,
        }

    async def attest_rpc(self, report_data: bytes) -> dict[str, Any]:
        att = await self.attestation(report_data)
        return {"attestation": encode_attestation(att).hex()}

    async def emit_event(self, event: str, payload: bytes) -> dict[str, Any]:
        if not event:
            raise RequestError("event", "event name cannot be empty")
        await asyncio.to_thread(self.backend.emit_event, event, payload)
        return {}

    async def info(self) -> dict[str, Any]:
        att = await self.attestation(bytes(64))
        info = self.app_info(att)
        report = parse_quote(att.quote).report
        tcb_info = ""
        if self.config.public_tcbinfo:
            tcb_info = json.dumps(
                {
                    "mrtd": report.mr_td.hex(),
                    "rtmr0": report.rtmr0.hex(),
                    "rtmr1": report.rtmr1.hex(),
                    "rtmr2": report.rtmr2.hex(),
                    "rtmr3": report.rtmr3.hex(),
                    "mr_aggregated": info.mr_aggregated.hex(),
                    "os_image_hash": info.os_image_hash.hex(),
                    "compose_hash": info.compose_hash.hex(),
                    "device_id": info.device_id.hex(),
                    "event_log": [event_to_json_obj(e) for e in att.event_log],
                    "app_compose": self.config.app_compose,
                },
                indent=2,
            )
        return {
            "app_id": info.app_id.hex(),
            "instance_id": info.instance_id.hex(),
            "app_cert": await self.app_cert(),
            "tcb_info": tcb_info,
            "app_name": self.config.app_name,
            "device_id": info.device_id.hex(),
            "mr_aggregated": info.mr_aggregated.hex(),
            "os_image_hash": info.os_image_hash.hex(),
            "key_provider_info": info.key_provider_info.decode("utf-8", "replace"),
            "compose_hash": info.compose_hash.hex(),
            "vm_config": self.config.vm_config if self.config.public_tcbinfo else "",
            "cloud_vendor": "",
            "cloud_product": "",
        }

    async def app_cert(self) -> str:
        """Info's ``app_cert``: dstack's "demo cert", a client certificate (CN ``demo-cert``,
        RA-TLS evidence) for a fresh key, issued as GetTlsKey's are, chain PEMs joined by a
        newline. Issued once, at the first Info (dstack: when its agent starts); a failed
        issuance answers "" and is tried again at the next Info, as dstack's does."""
        async with self._app_cert_lock:
            if not self._app_cert:
                try:
                    out = await self.tls_key(
                        self.fresh_tls_key(), subject="demo-cert", alt_names=(),
                        usage_ra_tls=True, usage_server_auth=False, usage_client_auth=True,
                        timeout=10.0,
                    )  # fmt: skip
                except KeyProviderError as e:
                    log.warning("Info app_cert: no demo certificate: %s", e)
                    return ""
                self._app_cert = "\n".join(out["certificate_chain"])
            return self._app_cert

    def version(self) -> dict[str, Any]:
        return {"version": AGENT_VERSION, "rev": AGENT_REV}

    # --- keys -------------------------------------------------------------------------

    def get_key(self, path: str, purpose: str, algorithm: str) -> dict[str, Any]:
        try:
            key, chain = k.get_key(
                self.keys.k256_key, self.keys.k256_signature, path, purpose, algorithm
            )
        except k.KeyError_ as e:
            raise RequestError(e.field, str(e)) from None
        return {"key": key.hex(), "signature_chain": [s.hex() for s in chain]}

    def sign(self, algorithm: str, data: bytes) -> dict[str, Any]:
        try:
            out = k.sign(self.keys.k256_key, self.keys.k256_signature, algorithm, data)
        except k.KeyError_ as e:
            raise RequestError(e.field, str(e)) from None
        sig, chain, pub = out["signature"], out["signature_chain"], out["public_key"]
        assert isinstance(sig, bytes) and isinstance(pub, bytes) and isinstance(chain, list)
        return {
            "signature": sig.hex(),
            "signature_chain": [c.hex() for c in chain],
            "public_key": pub.hex(),
        }

    def verify(
        self, algorithm: str, data: bytes, signature: bytes, public_key: bytes
    ) -> dict[str, Any]:
        try:
            return {"valid": k.verify(algorithm, data, signature, public_key)}
        except k.KeyError_ as e:
            raise RequestError(e.field, str(e)) from None

    async def tls_key(
        self,
        key: ec.EllipticCurvePrivateKey,
        *,
        subject: str,
        alt_names: Sequence[str],
        usage_ra_tls: bool,
        usage_server_auth: bool,
        usage_client_auth: bool,
        with_app_info: bool = False,
        not_before: int | None = None,
        not_after: int | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """A certificate for `key` from the app CA; RA-TLS evidence when `usage_ra_tls`.

        Keys from a KMS: the KMS's `SignCert` issues it (chain leaf, app CA, KMS root; dstack's
        `CertRequestClient::Kms`); local dev keys: their own CA signs it."""
        if not_before is not None and not_after is not None and not_before >= not_after:
            raise RequestError("not_before", "not_before must be earlier than not_after")
        bad = [n for n in alt_names if not n.isascii()]
        if bad:
            # A DNS SAN is an IA5String (ASCII): dstack's rcgen refuses these too.
            raise RequestError("alt_names", f"alt_names must be ASCII names or IP addresses, "
                               f"got {bad[0]!r}")  # fmt: skip
        pem = serialization.Encoding.PEM
        key_pem = key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        if self.keys.kms_url:
            chain = await self._kms_certificate(key, CertConfig(
                subject=subject, subject_alt_names=tuple(alt_names),
                usage_server_auth=usage_server_auth, usage_client_auth=usage_client_auth,
                ext_quote=usage_ra_tls, ext_app_info=with_app_info, not_before=not_before,
                not_after=not_after,
            ), timeout)  # fmt: skip
            return {"key": key_pem, "certificate_chain": chain}
        att = None
        info = None
        if usage_ra_tls or with_app_info:
            att = await self.attestation(ratls_report_data(key.public_key()))
            info = self.app_info(att) if with_app_info else None
        ca_cert, ca_key = self.keys.ca()
        cert = build_ratls_cert(
            key,
            att if usage_ra_tls else None,
            subject=subject,
            alt_names=alt_names,
            issuer=(ca_cert, ca_key),
            usage_server_auth=usage_server_auth,
            usage_client_auth=usage_client_auth,
            special_usage="app:custom",
            app_info=info,
            not_before=RCGEN_NOT_BEFORE if not_before is None else not_before,  # as dstack
            not_after=RCGEN_NOT_AFTER if not_after is None else not_after,
        )
        return {
            "key": key_pem,
            "certificate_chain": [cert.public_bytes(pem).decode(), self.keys.ca_cert_pem],
        }

    async def _kms_certificate(
        self, key: ec.EllipticCurvePrivateKey, config: CertConfig, timeout: float
    ) -> list[str]:
        """SignCert: the CSR's attestation binds `key`; the KMS decides on it (and embeds it
        or its AppInfo when `config` asks)."""
        att = await self.attestation(ratls_report_data(key.public_key()))
        app_id = self.app_info(att).app_id
        return await request_certificate(
            self.keys, key, config, encode_attestation(att),
            vm_config=self.config.vm_config, app_id=app_id, timeout=timeout,
        )  # fmt: skip

    def fresh_tls_key(self) -> ec.EllipticCurvePrivateKey:
        # dstack: HKDF of 32 random bytes with empty context; same distribution as a fresh key.
        return k.p256_from_seed(secrets.token_bytes(32), [])

    def derived_tls_key(self, path: str, random_seed: bool) -> ec.EllipticCurvePrivateKey:
        seed = secrets.token_bytes(32) if random_seed else self.keys.k256_key
        try:
            return k.p256_from_seed(seed, [path.encode()])
        except k.KeyError_ as e:
            raise RequestError(e.field, str(e)) from None

    def quote_report_data(self, data: bytes, hash_algorithm: str, prefix: str) -> bytes:
        return _hash_report_data(hash_algorithm, prefix or "app-data", data)


async def boot_runtime_events(
    backend: TdxBackend,
    keys: AppKeys,
    *,
    app_id: bytes,
    app_compose: str,
    instance_id: bytes,
    os_image_hash: bytes,
) -> list[TdxEvent]:
    """Emit what dstack's boot emits, in its order (simulated guests have no dstack-util)."""
    identity = await measure_identity(
        backend, app_id=app_id, app_compose=app_compose, instance_id=instance_id
    )
    return identity + await measure_after_keys(backend, keys, os_image_hash=os_image_hash)


async def measure_identity(
    backend: TdxBackend, *, app_id: bytes, app_compose: str, instance_id: bytes
) -> list[TdxEvent]:
    """The boot events a KMS needs to see before it hands out keys (dstack's order)."""
    compose_hash = hashlib.sha256(app_compose.encode()).digest()
    steps = [
        ("system-preparing", b""),
        ("app-id", app_id),
        ("compose-hash", compose_hash),
        ("instance-id", instance_id),
        ("boot-mr-done", b""),
    ]
    return [await asyncio.to_thread(backend.emit_event, n, p) for n, p in steps]


async def measure_after_keys(
    backend: TdxBackend, keys: AppKeys, *, os_image_hash: bytes
) -> list[TdxEvent]:
    """The rest of dstack's boot events, once the key provider is known (`pydstack_guest.
    rtmr3`: os-image-hash with a KMS only, key-provider under dstack's name); no storage-fs,
    as there is no data disk here."""
    kind = keys.provider_name if keys.provider_name in rtmr3.KINDS else "local"
    steps = [*rtmr3.key_events(kind, keys.provider_id, os_image_hash=os_image_hash),
             rtmr3.SYSTEM_READY]  # fmt: skip
    return [await asyncio.to_thread(backend.emit_event, n, p) for n, p in steps]
