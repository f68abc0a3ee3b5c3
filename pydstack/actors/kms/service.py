"""The KMS actor: root keys, evidence checks, authorization, decisions on the log, derivation.

    svc = await KmsService.open(store, KmsSettings(cluster="main", ...), backend=b,
                                collateral=src, keyfile=RootKeyFile(...), attester=agent)
    async with svc:                      # starts the writer, closes requests cut off by a crash
        keys = await svc.get_app_key(peer_cert_der, vm_config)

Nothing goes on the log before the request's evidence verified: a vm_config over
`MAX_VM_CONFIG` or an attestation over `MAX_ATTESTATION` bytes is refused before it is decoded,
and evidence that is malformed, not bound to the TLS key, stale, signed by no genuine platform
or whose logs do not replay (`Evidence.unverified`), or that cannot be checked (collateral
unavailable), is refused with a metric and a log line only (`refusal.py`). Once it verified,
the request's `KeyRequested` is stored while the backend is asked (and, for GetAppKey, the
keys are derived: the append's round trip hides behind both), its `KeyIssued`/`KeyDenied`
after; it is answered only once both are stored. A refusal by the policy (debug TD, TCB
status) of evidence that verified is a `KeyDenied` like a backend's. A started decision runs to
its end even if the client goes away. A KMS killed in between leaves a `KeyRequested` without
a decision: the restarted KMS closes each of its own with a `KeyDenied` (`ABANDONED`) before
serving, so no request stays half decided and none is decided twice; the client retries as a
new request.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

import msgspec
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.adapters.nats import EventStore
from pydstack.adapters.nats.errors import ConflictError, StoreError
from pydstack.adapters.nats.objectstore import EvidenceBucket
from pydstack.adapters.nats.store import new_event_id
from pydstack.adapters.tdx.identity import kms_bootstrap_report_data
from pydstack.adapters.tdx.ratls import Attester, build_ratls_cert
from pydstack.adapters.tdx.verify import Policy
from pydstack.core.events import (
    Event,
    KeyDenied,
    KeyIssued,
    KmsReplicaOnboarded,
    KmsRootCreated,
    subject,
)
from pydstack.core.kms import (
    AppKeyMaterial,
    AuthBackend,
    AuthVerdict,
    BootInfo,
    KeyRequest,
    KmsState,
    RootKeys,
    abandoned,
    app_ca_scalar,
    app_key_material,
    backend_failure,
    decide,
    env_public_key,
    fold,
    key_requested,
    precheck,
    quote_hash,
    temp_ca_scalar,
    undecided,
)
from pydstack.core.kms.blobs import lean
from pydstack.core.kms.derive import PerAppKeys, k256_public, per_app_keys

from ..trust import Judge
from .authority import KmsAuthority
from .bootview import with_key_provider
from .certgrants import CertGrants, Grant, RateLimited, at_boot, grant_key, grants_on_log
from .evidence import (
    MALFORMED,
    MAX_VM_CONFIG,
    OVERSIZE,
    CollateralSource,
    Evidence,
    Presented,
    attestation_hash,
    policy_json,
    present_certificate,
    present_csr,
    verify_presented,
)
from .images import check_request_image
from .keystore import RootKeyFile
from .log_backend import LogBackend
from .refusal import COLLATERAL_UNAVAILABLE, RATE_LIMITED, refuse
from .writer import DecisionLog

log = structlog.get_logger("pydstack.kms")
PER_APP_CACHE = 4096  # apps whose per-app derivations a KMS keeps
_T = TypeVar("_T")
YEAR = 365 * 86400


class KmsError(Exception):
    """The KMS cannot start or serve; the message says what to do."""


class NotOnboarded(KmsError):
    """The cluster has root keys on the log but this instance holds none: onboard it."""


class Denied(Exception):
    def __init__(self, reason: str, request_id: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


class KmsSettings(msgspec.Struct, frozen=True, kw_only=True):
    cluster: str
    policy: Policy = Policy()
    root_ca_der: bytes | None = None  # dev PKI root for simulator quotes; None = Intel
    # None (the default): a client certificate's notBefore is not checked. dstack v0.5.11's
    # guest signs it under the temp CA, whose key GetTempCaCert gives to anyone, with rcgen's
    # default notBefore (1975-01-01): the date is the client's own claim and bounds nothing.
    # What makes evidence current is in docs/threat-model.md ("RA-TLS freshness"). A number:
    # refuse certificates issued longer ago than that (only pydstack guests, which date theirs).
    max_cert_age: int | None = None
    rpc_domain: str = "kms.pydstack.local"
    instance_id: str = ""
    # App requests must name an image registered on the log whose measurements for the
    # claimed shape are the quote's (actors/kms/images). Off only for a KMS whose clients'
    # images are out of scope, e.g. a test of another rule; `up` and `pydstack kms` keep it.
    check_images: bool = True
    # Lean events (issue 18.2): a KeyRequested names its attestation by sha256 and the bytes go
    # to the stream's evidence bucket (adapters.nats.objectstore), stored while the request is
    # appended. False, or a bucket this KMS cannot open: inline, as before (with a warning).
    evidence_blobs: bool = True


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _self_signed_ca(
    key: ec.EllipticCurvePrivateKey, subject: str, path_len: int, now: int
) -> x509.Certificate:
    return build_ratls_cert(
        key,
        None,
        subject=subject,
        org_name="Dstack",
        ca_path_len=path_len,
        not_before=now - 3600,
        not_after=now + 20 * YEAR,
    )


async def _load_state(store: EventStore, subj: str) -> KmsState:
    """The cluster's state from the events on its subject that the write policy allows (a
    KmsRootCreated or KeyIssued not signed by a KMS key of the keyring is skipped)."""
    records, _ = await store.read_aggregate(subj)
    return fold(ok.event for ok in await Judge("kms", store.anchor).admitted(store, records))


class KmsService:
    def __init__(
        self,
        store: EventStore,
        settings: KmsSettings,
        *,
        backend: AuthBackend,
        collateral: CollateralSource,
        root: RootKeys,
        created: KmsRootCreated,
        attester: Attester | None = None,
        clock: Callable[[], float] = time.time,
        authority: KmsAuthority | None = None,
        bucket: EvidenceBucket | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.backend = backend
        # Who may get the root keys (GetKmsKey): never the dev backend on its own.
        self.authority = authority or KmsAuthority()
        self.collateral = collateral
        self.root = root
        # Per-app derivations (k256 key and its root signature, env key) are deterministic
        # and shared by every instance of an app: kept, LRU, instead of redone per boot.
        self._per_app: dict[bytes, PerAppKeys] = {}
        self.created = created
        self.attester = attester
        self.clock = clock
        self.subject = subject("kms", settings.cluster)
        self.log = DecisionLog(store, self.subject, bucket)  # bucket None: evidence inline
        self._policy_json = policy_json(settings.policy)
        self.ca_cert = x509.load_pem_x509_certificate(created.ca_cert_pem.encode())
        if self.ca_cert.public_key() != root.ca_key().public_key():
            raise KmsError("root CA key does not match the KmsRootCreated certificate on the log")
        if k256_public(root.k256) != created.k256_public_key:
            raise KmsError("root k256 key does not match the KmsRootCreated public key")
        self.temp_key = ec.derive_private_key(temp_ca_scalar(root), ec.SECP256R1())
        self.temp_cert_pem = created.temp_ca_cert_pem
        self._deciding: set[asyncio.Task[Any]] = set()
        self.cert_grants = CertGrants()  # SignCert decisions, re-used per instance and usage
        self._grants_lock = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        store: EventStore,
        settings: KmsSettings,
        *,
        backend: AuthBackend,
        collateral: CollateralSource,
        keyfile: RootKeyFile,
        attester: Attester | None = None,
        clock: Callable[[], float] = time.time,
        authority: KmsAuthority | None = None,
    ) -> KmsService:
        """Load this instance's root keys; create them (once per cluster) if the log has none."""
        subj = subject("kms", settings.cluster)
        state = await _load_state(store, subj)
        if state.root is None:
            root, created = await cls._bootstrap(store, settings, keyfile, attester, clock)
        else:
            if not keyfile.exists():
                raise NotOnboarded(
                    f"cluster {settings.cluster!r} already has root keys (created by "
                    f"{state.root.instance_id or 'another instance'}); onboard this instance "
                    "from a running replica (`pydstack up --kms-onboard URL`, or "
                    "`python -m pydstack.actors.kms --onboard-from URL`)"
                )
            root, created = await keyfile.load(), state.root
        bucket = await _evidence_bucket(store) if settings.evidence_blobs else None
        return cls(
            store,
            settings,
            backend=backend,
            collateral=collateral,
            root=root,
            created=created,
            attester=attester,
            clock=clock,
            authority=authority,
            bucket=bucket,
        )

    @staticmethod
    async def _bootstrap(
        store: EventStore,
        settings: KmsSettings,
        keyfile: RootKeyFile,
        attester: Attester | None,
        clock: Callable[[], float],
    ) -> tuple[RootKeys, KmsRootCreated]:
        now = int(clock())
        ca_key = ec.generate_private_key(ec.SECP256R1())
        root = RootKeys(ca_scalar=ca_key.private_numbers().private_value, k256=_k256_secret())
        temp_key = ec.derive_private_key(temp_ca_scalar(root), ec.SECP256R1())
        ca_spki = root.ca_public_der()
        if attester is None:  # a root with no evidence: no CVM could tell it from a host's
            raise KmsError(
                f"cluster {settings.cluster!r} has no root keys yet and this KMS cannot attest "
                "itself (no guest agent, no simulator): refusing to create an unattested root"
            )
        from pydstack.adapters.tdx.attestation import encode_attestation

        # dstack's binding (`attest_keys`), so dstack's tooling verifies our root too
        rd = kms_bootstrap_report_data(ca_spki, root.k256_public())
        raw_att = encode_attestation(await attester.attest(rd))
        created = KmsRootCreated(
            cluster=settings.cluster,
            ca_public_key=ca_spki,
            k256_public_key=root.k256_public(),
            attestation_hash=attestation_hash(raw_att),
            ca_cert_pem=pem(_self_signed_ca(ca_key, "Dstack KMS CA", 1, now)),
            temp_ca_cert_pem=pem(_self_signed_ca(temp_key, "Dstack Client Temp CA", 0, now)),
            instance_id=settings.instance_id,
            attestation=raw_att,
        )
        # Sealed to disk first: a root on the log that no instance can open would brick it.
        await keyfile.save(root)
        subj = subject("kms", settings.cluster)
        try:
            await store.append(subj, [created], 0)
        except Exception:
            keyfile.path.unlink(missing_ok=True)
            raise
        log.info("kms root created", cluster=settings.cluster, k256=created.k256_public_key.hex())
        return root, created

    async def __aenter__(self) -> Self:
        await self.log.__aenter__()
        try:
            await self._close_cut_off()
        except BaseException:
            await self.log.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._deciding:  # let started decisions reach the log rather than leave them open
            await asyncio.wait(self._deciding, timeout=10)
        await self.log.__aexit__(et, e, tb)

    async def _close_cut_off(self) -> None:
        """Decide (KeyDenied, ABANDONED) every request this instance logged but never decided.

        Only our own actor's: another replica's open request may be in flight. Its client got
        no answer (answers wait for the decision), so refusing it is what happened. Appended
        with OCC on the version the closures were computed from: if anything landed since
        (say, the decision of a request whose publish was still on the wire when we died),
        the closures are recomputed rather than appended blindly.
        """
        for _attempt in range(20):
            records, version = await self.store.read_aggregate(self.subject)
            judge = Judge("kms", self.store.anchor)
            allowed = await judge.admitted(self.store, records)
            entries = [(ok.envelope.actor, ok.event) for ok in allowed]
            cut_off = undecided(entries, self.store.signer.actor, self.settings.instance_id)
            if not cut_off:
                return
            try:
                await self.store.append(self.subject, [abandoned(r) for r in cut_off], version)
            except ConflictError:
                continue
            for req in cut_off:
                log.warning("kms request abandoned by a restart", request_id=req.request_id)
            return
        raise KmsError("could not close the requests cut off by a restart: the log kept moving")

    # -- TLS identity -----------------------------------------------------------------------------

    async def rpc_identity(self) -> tuple[str, str]:
        """(chain PEM, key PEM) of this instance's `kms:rpc` RA-TLS certificate."""
        now = int(self.clock())
        key = ec.generate_private_key(ec.SECP256R1())
        att = None
        if self.attester is not None:
            from pydstack.adapters.tdx.ratls import ratls_report_data

            att = await self.attester.attest(ratls_report_data(key.public_key()))
        cert = build_ratls_cert(
            key,
            att,
            subject=self.settings.rpc_domain,
            alt_names=[self.settings.rpc_domain, "localhost"],
            issuer=(self.ca_cert, self.root.ca_key()),
            usage_server_auth=True,
            special_usage="kms:rpc",
            not_before=now - 3600,
            not_after=now + YEAR,
        )
        return pem(cert) + self.created.ca_cert_pem, key_pem(key)

    # -- decisions --------------------------------------------------------------------------------

    def _bounded(self, method: str, vm_config: str) -> None:
        """Refuse (nothing appended) a vm_config a KeyRequested may not store."""
        size = len(vm_config.encode())
        if size > MAX_VM_CONFIG:
            raise refuse(method, OVERSIZE, f"vm_config is {size} bytes, over the "
                         f"{MAX_VM_CONFIG}-byte limit (dstack's is a small JSON object)",
                         field="vm_config")  # fmt: skip

    async def _verified(self, method: str, p: Presented, vm_config: str, now: int) -> Evidence:
        """The evidence once it verified; else `Refused`, counted and logged, nothing appended.
        What remains in its reasons is the policy's (a decision on the log)."""
        if p.attestation is None:
            why = "attestation refused: " + "; ".join(p.reasons)
            raise refuse(method, p.kind or MALFORMED, why)
        try:
            coll = await self.collateral(p.quote)
        except Exception as e:
            raise refuse(
                method,
                COLLATERAL_UNAVAILABLE,
                f"collateral unavailable: {type(e).__name__}: {e}; the evidence cannot be "
                "checked now, retry later",
            ) from None
        ev = verify_presented(
            p,
            coll,
            policy=self.settings.policy,
            now=now,
            root_ca_der=self.settings.root_ca_der,
            max_age=self.settings.max_cert_age,
            vm_config=vm_config,
        )
        if not ev.verified:
            raise refuse(method, ev.kind, "attestation refused: " + "; ".join(ev.reasons),
                         quote_hash=quote_hash(p.quote))  # fmt: skip
        return with_key_provider(ev)  # dstack's BootInfo names the key provider

    async def _decision(
        self, method: str, p: Presented, vm_config: str, now: int, *, kms: bool = False,
        token: str = "",
    ) -> tuple[str, Any]:  # fmt: skip
        """Verify the evidence (`Refused`: nothing appended), then store the request while the
        backend is asked, store the decision; Denied on refusal. The decision is shielded: a
        client that goes away does not cut it short. Callers bound vm_config first."""
        ev = await self._verified(method, p, vm_config, now)
        decision = self._decide(method, p, ev, vm_config, now, kms=kms, token=token)
        rid, outcome, _ = await self._shielded(decision)
        return rid, outcome

    async def decide_csr(
        self, att_raw: bytes, spki: bytes, vm_config: str, now: int, usage: str = "none"
    ) -> tuple[str, KeyIssued, Evidence]:
        """SignCert's decision, bounded per instance, compose hash and `usage` (`certgrants`):
        the attestation must bind the CSR's key (`spki`); Denied, or `Refused` (nothing
        appended: evidence, bounds, or another decision for this instance inside its window)
        otherwise. Returns the deciding request's id, its KeyIssued and this request's own
        verified evidence (what the certificate may embed)."""
        self._bounded("SignCert", vm_config)
        p = present_csr(att_raw, spki)
        ev = await self._verified("SignCert", p, vm_config, now)
        if ev.boot is not None and p.attestation is not None:  # dstack: the boot-time view
            boot_time = at_boot(ev.boot, p.quote, p.attestation.runtime_events)
            ev = msgspec.structs.replace(ev, boot=boot_time)
        if not self.cert_grants.loaded:
            await self._load_grants()
        boot = ev.boot
        key = grant_key(boot, usage) if boot is not None else (
            p.claimed("app-id"), p.claimed("instance-id"), "", usage)  # fmt: skip

        fresh: list[Grant] = []  # the decision this request made, if any

        async def decision() -> Grant:
            grant = await decided()
            fresh.append(grant)
            return grant

        async def decided() -> Grant:
            try:
                rid, outcome, _ = await self._shielded(
                    self._decide("SignCert", p, ev, vm_config, now, kms=False, usage=usage)
                )
            except Denied as d:
                return Grant(d.request_id, now, KeyDenied(request_id=d.request_id,
                             reason=d.reason, boot_info=boot))  # fmt: skip
            return Grant(rid, now, outcome)

        try:
            grant = await self.cert_grants.decide(key, boot, now, decision)
            if grant not in fresh and isinstance(grant.outcome, KeyIssued) and boot is not None:
                # a re-used issue: revoked since (image, log backend's compose)? decide anew
                if await self._revoked_since(boot, vm_config, p.quote):
                    self.cert_grants.drop(key, grant)
                    grant = await self.cert_grants.decide(key, boot, now, decision)
        except RateLimited as r:
            raise refuse("SignCert", RATE_LIMITED, r.reason, app_id=key[0],
                         instance_id=key[1]) from None  # fmt: skip
        if isinstance(grant.outcome, KeyDenied):
            raise Denied(grant.outcome.reason, grant.request_id)
        return grant.request_id, grant.outcome, ev

    async def _revoked_since(self, boot: BootInfo, vm_config: str, quote: bytes) -> str:
        """Why a re-used SignCert issue for `boot` no longer holds, from what this KMS reads
        on the log itself: its image was revoked (or fails the check for this request), or
        the log backend no longer allows its compose. '' while it holds. A webhook's or a
        contract's change is seen at the next decision (the grant's window)."""
        if self.settings.check_images:
            checked = await check_request_image(
                self.store, boot.os_image_hash, vm_config, quote,
                simulated=self.settings.root_ca_der is not None,
            )  # fmt: skip
            if not checked.ok:
                return "; ".join(checked.reasons)
        if isinstance(self.backend, LogBackend):
            verdict = await self.backend.authorize_app(boot)
            if not verdict.is_allowed:
                return verdict.reason
        return ""

    async def _load_grants(self) -> None:
        """The SignCert grants already on the log, once, before this instance's first."""
        async with self._grants_lock:
            if self.cert_grants.loaded:
                return
            records, _ = await self.store.read_aggregate(self.subject)
            allowed = await Judge("kms", self.store.anchor).admitted(self.store, records)
            self.cert_grants.load(grants_on_log(ok.event for ok in allowed))

    async def _shielded(self, decision: Coroutine[Any, Any, _T]) -> _T:
        task = asyncio.create_task(decision)
        self._deciding.add(task)
        task.add_done_callback(self._deciding.discard)
        return await asyncio.shield(task)

    async def _ask(self, ev: Evidence, kms: bool, token: str) -> tuple[AuthVerdict | None, str]:
        """The verdict on verified evidence and, for a KMS, what authorized it."""
        if ev.reasons or ev.boot is None:
            return None, ""  # refused by the policy: the backend is not asked
        try:
            if kms:
                return await self.authority.authorize_replica(
                    self.backend, ev.boot, ev.quote, token
                )
            return await self.backend.authorize_app(ev.boot), ""
        except Exception as e:  # a broken backend refuses; it never allows
            return backend_failure(self.backend.name, f"{type(e).__name__}: {e}"), ""

    async def _decide(
        self,
        method: str,
        p: Presented,
        ev: Evidence,
        vm_config: str,
        now: int,
        *,
        kms: bool,
        prepare: Callable[[BootInfo], _T] | None = None,
        token: str = "",
        usage: str = "",
    ) -> tuple[str, Any, _T | None]:
        """Store the request of verified evidence `ev` and its decision. `prepare`: CPU work
        for the answer (key derivation), done while the request travels to the log and the
        backend thinks; what it makes leaves this KMS only with a stored KeyIssued."""
        rid = new_event_id()
        req = KeyRequest(
            request_id=rid,
            method=method,
            attestation=p.raw,
            quote=p.quote,
            vm_config=vm_config,
            policy=self._policy_json,
            verified_at=now,
            kms_instance=self.settings.instance_id,
            app_id=p.claimed("app-id"),  # verified: the runtime events replayed to RTMR3
            instance_id=p.claimed("instance-id"),
            usage=usage,  # SignCert: what its grant is for (certgrants)
        )
        # The request goes on the log while the image is checked and the backend is asked:
        # the append's round trip hides behind theirs instead of adding to it.
        requested, blob = key_requested(req), b""
        if self.log.bucket is not None:  # lean: the attestation to the bucket, by its hash
            requested, blob = lean(requested)
        stored = asyncio.ensure_future(self.log.append([requested], blobs=[blob]))
        image_check = ""
        if self.settings.check_images and not kms and ev.boot is not None:
            try:
                checked = await check_request_image(
                    self.store, ev.boot.os_image_hash, vm_config, ev.quote,
                    simulated=self.settings.root_ca_der is not None,
                )  # fmt: skip
                image_check = checked.summary
                if not checked.ok:  # a policy reason: the backend is not asked
                    ev = msgspec.structs.replace(ev, reasons=(*ev.reasons, *checked.reasons))
            except BaseException:
                await asyncio.gather(stored, return_exceptions=True)
                raise
        asking = asyncio.ensure_future(self._ask(ev, kms, token))
        prepared, broken = None, ""
        try:
            await _io_turns()  # let the append and the backend's request reach their sockets
            if prepare is not None and ev.boot is not None and not precheck(ev.boot, ev.reasons):
                try:
                    prepared = prepare(ev.boot)
                except Exception as e:  # the request is (being) logged: it must be decided
                    broken = f"KMS could not derive the keys: {type(e).__name__}: {e}"
            verdict, authorization = await asking
        finally:
            if not asking.done():
                asking.cancel()
            await stored  # not stored: nothing is decided, the client gets an error
        outcome = decide(
            req, reasons=ev.reasons, boot=ev.boot, verdict=verdict, backend=self.backend.name,
            tee="simulated" if self.settings.root_ca_der is not None else "tdx",  # dev PKI: sim
        )  # fmt: skip
        if image_check and isinstance(outcome, KeyIssued):
            outcome = msgspec.structs.replace(outcome, image_check=image_check)
        if broken and isinstance(outcome, KeyIssued):
            outcome = KeyDenied(request_id=rid, reason=broken, boot_info=ev.boot,
                                quote_hash=outcome.quote_hash)  # fmt: skip
        events: list[Event] = [outcome]
        issued = not hasattr(outcome, "reason")
        if issued and kms and ev.boot is not None:
            events.append(
                KmsReplicaOnboarded(
                    cluster=self.settings.cluster,
                    replica_id=ev.boot.instance_id,
                    attestation_hash=attestation_hash(ev.attestation),
                    boot_info=ev.boot,
                    request_id=rid,
                    authorization=authorization,  # what allowed it; never the token
                )
            )
        await self.log.append(events)
        log.info(
            "kms decision",
            method=method,
            request_id=rid,
            issued=issued,
            app_id=req.app_id,
            reason=getattr(outcome, "reason", ""),
        )
        if not issued:
            raise Denied(str(getattr(outcome, "reason", "")), rid)
        return rid, outcome, prepared

    def _app_keys(self, boot: BootInfo) -> AppKeyMaterial:
        app_id = bytes.fromhex(boot.app_id)
        per_app = self._per_app.pop(app_id, None) or per_app_keys(self.root, app_id)
        self._per_app[app_id] = per_app  # most recently used last
        if len(self._per_app) > PER_APP_CACHE:
            del self._per_app[next(iter(self._per_app))]
        return app_key_material(self.root, app_id, bytes.fromhex(boot.instance_id), per_app)

    async def get_app_key(self, der: bytes, vm_config: str) -> dict[str, Any]:
        now = int(self.clock())
        self._bounded("GetAppKey", vm_config)
        p = present_certificate(der)
        ev = await self._verified("GetAppKey", p, vm_config, now)
        _, issued, keys = await self._shielded(
            self._decide("GetAppKey", p, ev, vm_config, now, kms=False, prepare=self._app_keys)
        )
        assert keys is not None  # prepared for every KeyIssued; a refusal raised Denied
        boot = issued.boot_info
        return {
            "ca_cert": self.created.ca_cert_pem,
            "disk_crypt_key": keys.disk_crypt_key.hex(),
            "env_crypt_key": keys.env_crypt_key.hex(),
            "k256_key": keys.k256_key.hex(),
            "k256_signature": keys.k256_signature.hex(),
            "tproxy_app_id": issued.gateway_app_id,
            "gateway_app_id": issued.gateway_app_id,
            "os_image_hash": boot.os_image_hash,
        }

    async def get_kms_key(self, der: bytes, vm_config: str, token: str = "") -> dict[str, Any]:
        """The root keys, for a replica its authorization allows (`KmsAuthority`); `token`:
        the onboarding token it presented inside the mutual RA-TLS channel."""
        now = int(self.clock())
        self._bounded("GetKmsKey", vm_config)
        p = present_certificate(der)
        await self._decision("GetKmsKey", p, vm_config, now, kms=True, token=token)
        return {
            "temp_ca_key": key_pem(self.temp_key),
            "keys": [{"ca_key": key_pem(self.root.ca_key()), "k256_key": self.root.k256.hex()}],
        }

    def env_pubkey(self, app_id: bytes) -> dict[str, Any]:
        resp = env_public_key(self.root, app_id, int(self.clock()))
        return {
            "public_key": resp.public_key.hex(),
            "signature": resp.signature.hex(),
            "timestamp": resp.timestamp,
            "signature_v1": resp.signature_v1.hex(),
        }

    def meta(self) -> dict[str, Any]:
        return {
            "ca_cert": self.created.ca_cert_pem,
            "allow_any_upgrade": self.backend.name == "dev",
            "k256_pubkey": self.created.k256_public_key.hex(),
            "bootstrap_info": {
                "ca_pubkey": self.created.ca_public_key.hex(),
                "k256_pubkey": self.created.k256_public_key.hex(),
                "attestation": self.created.attestation.hex(),
            },
            "is_dev": self.backend.name == "dev",
        }

    def temp_ca(self) -> dict[str, Any]:
        return {
            "temp_ca_cert": self.temp_cert_pem,
            "temp_ca_key": key_pem(self.temp_key),
            "ca_cert": self.created.ca_cert_pem,
        }

    def app_ca(self, app_id: bytes) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """dstack `derive_app_ca`: a per-app CA (derived key) signed by the root CA."""
        key = ec.derive_private_key(app_ca_scalar(self.root, app_id), ec.SECP256R1())
        now = int(self.clock())
        cert = build_ratls_cert(
            key,
            None,
            subject="Dstack App CA",
            org_name="Dstack",
            ca_path_len=0,
            issuer=(self.ca_cert, self.root.ca_key()),
            app_id=app_id,
            special_usage="app:ca",
            not_before=now - 3600,
            not_after=now + 10 * YEAR,
        )
        return cert, key


async def _evidence_bucket(store: EventStore) -> EvidenceBucket | None:
    """The stream's evidence bucket, created if missing; None (evidence inline, warned) when
    this KMS cannot open it (a NATS cluster whose permissions predate the bucket)."""
    try:
        return await EvidenceBucket.ensure(store)
    except StoreError as exc:
        log.warning("evidence bucket unavailable: KeyRequested keeps its attestation inline",
                    error=str(exc))  # fmt: skip
        return None


async def _io_turns() -> None:
    """Yield the loop three times: an append just started runs its task, the decision log's
    writer and nats-py's flusher (one turn each), so its bytes are on the socket before this
    task goes on with CPU work while the server stores them."""
    for _turn in range(3):
        await asyncio.sleep(0)


def _k256_secret() -> bytes:
    while True:
        k = secrets.token_bytes(32)
        if (
            0
            < int.from_bytes(k, "big")
            < int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141", 16)
        ):
            return k


def fingerprint(pem_text: str) -> str:
    return hashlib.sha256(pem_text.encode()).hexdigest()[:16]
