"""An ACME account and its orders, on certbot's ``acme`` library (RFC 8555, DNS-01 only).

The library is synchronous (``requests``); each network step runs in a worker thread and
the DNS provider's steps run on the event loop in between. Usage::

    config = AcmeConfig("https://acme-v02.api.letsencrypt.org/directory")
    client = await AcmeClient.open(config, account_key_pem, contact=("mailto:ops@x.org",))
    issued = await client.issue(("*.example.com", "example.com"), cert_key_pem, dns)
    issued.chain_pem, issued.not_after

Registering with a key that already has an account is idempotent: the CA answers with the
existing account's URL, so every gateway node can open the cluster's one account.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from .dns import DnsProvider
from .errors import AcmeError

_log = logging.getLogger("pydstack.acme")


@dataclass(frozen=True, slots=True)
class AcmeConfig:
    directory_url: str
    ca_bundle: str | None = None  # PEM file the CA's HTTPS chains to (None: system roots)
    timeout_s: float = 120.0  # per order: authorizations and finalization
    user_agent: str = "pydstack-gateway"


@dataclass(frozen=True, slots=True)
class Issued:
    names: tuple[str, ...]
    chain_pem: str  # leaf first
    not_before: int  # unix seconds
    not_after: int


def _jwk(account_key_pem: bytes) -> JWKEC:
    key = serialization.load_pem_private_key(account_key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise AcmeError("the ACME account key must be an ECDSA P-256 key")
    return JWKEC(key=key)


def thumbprint(account_key_pem: bytes) -> str:
    """RFC 7638 thumbprint (sha256, hex) of the account key's public half."""
    return bytes(_jwk(account_key_pem).public_key().thumbprint()).hex()


def certificate_times(chain_pem: str) -> tuple[int, int]:
    """(not_before, not_after) of the leaf (the first certificate) as unix seconds."""
    leaf = x509.load_pem_x509_certificate(chain_pem.encode())
    return (
        int(leaf.not_valid_before_utc.timestamp()),
        int(leaf.not_valid_after_utc.timestamp()),
    )


def _why(exc: BaseException) -> str:
    if isinstance(exc, messages.Error):
        return f"{exc.typ.rsplit(':', 1)[-1]}: {exc.detail or exc.title or ''}".strip()
    if isinstance(exc, errors.ValidationError):
        details = [
            f"{a.body.identifier.value}: {c.error.detail if c.error else c.status}"
            for a in exc.failed_authzrs
            for c in a.body.challenges
            if c.error is not None
        ]
        return "validation failed (" + "; ".join(details) + ")"
    if isinstance(exc, errors.TimeoutError):
        return "the CA did not finish in time"
    if isinstance(exc, requests.RequestException):
        return f"CA unreachable: {type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"


class AcmeClient:
    """One account at one ACME directory."""

    def __init__(self, config: AcmeConfig, acme: client.ClientV2, key: JWKEC) -> None:
        self.config = config
        self._acme = acme
        self._key = key
        self.account_uri = ""

    @classmethod
    async def open(
        cls, config: AcmeConfig, account_key_pem: bytes, *, contact: Sequence[str] = ()
    ) -> AcmeClient:
        """Fetch the directory and register (or find) the account of ``account_key_pem``."""
        key = _jwk(account_key_pem)
        net = client.ClientNetwork(key, alg=ES256, user_agent=config.user_agent)
        if config.ca_bundle:
            # requests takes a CA file path where acme passes `verify_ssl` on as `verify=`.
            net.verify_ssl = config.ca_bundle  # type: ignore[assignment]
        try:
            directory = await asyncio.to_thread(
                client.ClientV2.get_directory, config.directory_url, net
            )
        except Exception as exc:
            raise AcmeError(f"ACME directory {config.directory_url}: {_why(exc)}") from None
        self = cls(config, client.ClientV2(directory, net), key)
        await self._register(tuple(contact))
        return self

    async def _register(self, contact: tuple[str, ...]) -> None:
        reg = messages.NewRegistration(contact=contact, terms_of_service_agreed=True)
        try:
            regr = await asyncio.to_thread(self._acme.new_account, reg)
            self.account_uri = regr.uri or ""
        except errors.ConflictError as exc:  # the key has an account already: use it
            self._acme.net.account = messages.RegistrationResource(
                uri=exc.location, body=messages.Registration()
            )
            self.account_uri = exc.location
        except Exception as exc:
            raise AcmeError(f"ACME account registration: {_why(exc)}") from None

    @property
    def thumbprint(self) -> str:
        return bytes(self._key.public_key().thumbprint()).hex()

    async def issue(self, names: Sequence[str], cert_key_pem: bytes, dns: DnsProvider) -> Issued:
        """Order a certificate for ``names`` (wildcards allowed) with DNS-01, finalize it with
        a CSR for ``cert_key_pem`` and download the chain. Records are removed afterwards."""
        csr = crypto_util.make_csr(cert_key_pem, list(names))
        try:
            order = await asyncio.to_thread(self._acme.new_order, csr)
        except Exception as exc:
            raise AcmeError(f"new order for {', '.join(names)}: {_why(exc)}") from None
        pending = self._dns_challenges(order)
        published: list[tuple[str, str]] = []
        try:
            for _, _, name, validation in pending:
                await dns.add_txt(name, validation)
                published.append((name, validation))
            if pending and dns.propagation_s > 0:
                await asyncio.sleep(dns.propagation_s)
            for challb, response, _, _ in pending:
                await asyncio.to_thread(self._acme.answer_challenge, challb, response)
            deadline = dt.datetime.now() + dt.timedelta(seconds=self.config.timeout_s)
            done = await asyncio.to_thread(self._acme.poll_and_finalize, order, deadline)
        except AcmeError:
            raise
        except Exception as exc:
            raise AcmeError(f"order for {', '.join(names)}: {_why(exc)}") from None
        finally:
            for name, validation in published:
                try:
                    await dns.remove_txt(name, validation)
                except AcmeError as exc:  # a leftover TXT record is harmless; say so once
                    _log.warning("could not remove %s: %s", name, exc)
        chain = done.fullchain_pem
        if not chain:
            raise AcmeError(f"order for {', '.join(names)} finished without a certificate")
        not_before, not_after = certificate_times(chain)
        return Issued(tuple(names), chain, not_before, not_after)

    def _dns_challenges(
        self, order: messages.OrderResource
    ) -> list[tuple[messages.ChallengeBody, challenges.ChallengeResponse, str, str]]:
        """(challenge, response, TXT name, TXT value) for each authorization still pending."""
        out: list[tuple[messages.ChallengeBody, challenges.ChallengeResponse, str, str]] = []
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue  # the CA reused an earlier validation
            challb = next(
                (c for c in authz.body.challenges if isinstance(c.chall, challenges.DNS01)),
                None,
            )
            if challb is None:
                raise AcmeError(f"the CA offers no dns-01 challenge for {authz.body.identifier}")
            chall = challb.chall
            assert isinstance(chall, challenges.DNS01)
            response, validation = chall.response_and_validation(self._key)
            name = chall.validation_domain_name(authz.body.identifier.value)
            out.append((challb, response, name, validation))
        return out
