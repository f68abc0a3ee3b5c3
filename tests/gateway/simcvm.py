"""Simulated CVMs for the RegisterCvm tests: a TDX simulator backend that has measured a
dstack boot (app-id, compose-hash, instance-id into RTMR3) and an RA-TLS client certificate
in the shape KMS ``SignCert`` issues: leaf, the app's CA (``app:ca``, its app id), and a
shared test CA standing in for the KMS root."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.adapters.tdx.attestation import Attestation
from pydstack.adapters.tdx.backend import SimulatorBackend
from pydstack.adapters.tdx.eventlog import runtime_events_of
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import build_ratls_cert, ratls_report_data
from pydstack.adapters.tdx.simulator import QuoteSimulator, TdMeasurements


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@dataclass
class DevCa:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls) -> DevCa:
        key = ec.generate_private_key(ec.SECP256R1())
        now = int(time.time())
        cert = build_ratls_cert(
            key,
            None,
            subject="pydstack test CA",
            ca_path_len=1,
            not_before=now - 3600,
            not_after=now + 86400,
        )
        return cls(cert, key)

    @property
    def pem(self) -> str:
        return pem(self.cert)

    def app_ca(self, app_id: bytes) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """An app's CA under this CA, as the KMS derives one (``app:ca``, the app id)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = int(time.time())
        cert = build_ratls_cert(
            key, None, subject="Dstack App CA", ca_path_len=0, issuer=(self.cert, self.key),
            app_id=app_id, special_usage="app:ca", not_before=now - 3600, not_after=now + 86400,
        )  # fmt: skip
        return cert, key

    def plain_identity(self) -> tuple[str, str]:
        """A client certificate from the CA with no attestation at all."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = int(time.time())
        cert = build_ratls_cert(
            key,
            None,
            subject="plain",
            issuer=(self.cert, self.key),
            usage_client_auth=True,
            usage_server_auth=True,
            not_before=now - 60,
            not_after=now + 3600,
        )
        return pem(cert) + self.pem, key_pem(key)


class SimCvm:
    """One simulated CVM; ``attest`` makes it an ``ratls.Attester``."""

    def __init__(self, pki: DevPki, app_id: bytes, instance_id: bytes, compose: bytes) -> None:
        self.app_id, self.instance_id = app_id, instance_id
        self.compose_hash = hashlib.sha256(compose).digest()
        self.backend = SimulatorBackend(
            QuoteSimulator(pki), TdMeasurements(mr_td=hashlib.sha384(b"sim TD").digest())
        )
        for name, payload in (
            ("system-preparing", b""),
            ("app-id", app_id),
            ("compose-hash", self.compose_hash),
            ("instance-id", instance_id),
            ("boot-mr-done", b""),
            ("key-provider", b"{}"),
            ("system-ready", b""),
        ):
            self.backend.emit_event(name, payload)

    async def attest(self, report_data: bytes) -> Attestation:
        data = report_data.ljust(64, b"\0")
        quote, log = await asyncio.to_thread(self.backend.attest, data)
        return Attestation(quote, tuple(log), tuple(runtime_events_of(log)), data)

    async def identity(self, ca: DevCa) -> tuple[str, str]:
        """(chain PEM, key PEM) of a fresh RA-TLS certificate as KMS SignCert issues it: under
        this app's CA, which ``ca`` (the stand-in KMS root) signed."""
        now = int(time.time())
        app_ca, app_ca_key = ca.app_ca(self.app_id)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build_ratls_cert(
            key, await self.attest(ratls_report_data(key.public_key())), subject="RA-TLS Cert",
            issuer=(app_ca, app_ca_key), usage_server_auth=True, usage_client_auth=True,
            app_id=self.app_id, special_usage="app:custom", not_before=now - 60,
            not_after=now + 3600,
        )  # fmt: skip
        return pem(cert) + pem(app_ca) + ca.pem, key_pem(key)
