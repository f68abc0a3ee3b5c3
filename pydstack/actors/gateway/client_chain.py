"""Who may register: a CVM whose client certificate the KMS issued for its app (dstack's
gateway admission).

A CVM registers with a certificate from KMS ``SignCert``: the chain is its leaf, its app's
own CA (``app:ca``, the app id in the certificate, a key only the KMS derives) and the KMS
root CA of the cluster (``KmsRootCreated.ca_cert_pem``). TLS trusts only that root; this
check then holds the chain TLS verified to the shape only the KMS can make, for the app the
attested event log names:

1. exactly leaf, app CA, root, and the root is one of the KMS roots given (never the KMS
   temp CA: ``GetTempCaCert`` hands its private key to anyone, so a certificate under it
   proves nothing, and a "per-app CA" under it is anyone's);
2. the app CA is a CA signed by that root, names special usage ``app:ca`` and the app id;
3. the leaf is signed by that app CA, names ``app:custom`` and the same app id.

A certificate the KMS issued to another app (its app CA, its app id) is refused for a
victim's app id, and so is one the CVM's attestation does not name: the attested app id
(its runtime events, checked by the RA-TLS middleware) must be the certificate's.

    roots, temps = await kms_cas(store, "main")   # from the log's KmsRootCreated
    check = AppChainCheck.from_pem(roots, never_pem=temps)
    why = check.reason(peer_chain_der(request.transport), attested_app_id)  # None: admitted
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from pydstack.actors.trust import Judge
from pydstack.adapters.nats import EventStore
from pydstack.adapters.tdx.errors import TdxError
from pydstack.adapters.tdx.ratls import app_id_of, special_usage

APP_CA_USAGE = "app:ca"
APP_CERT_USAGE = "app:custom"


async def kms_cas(store: EventStore, cluster: str = "") -> tuple[str, str]:
    """(root CAs, temp CAs) of the KMS clusters on the log (only `cluster`'s roots when
    given), from the `KmsRootCreated` events a KMS key signed."""
    from pydstack.core.events import KmsRootCreated

    roots: list[str] = []
    temps: list[str] = []
    recs = [rec async for rec in store.read(subject="dstack.kms.*")]
    for ok in await Judge("gateway", store.anchor).admitted(store, recs):
        e = ok.event
        if isinstance(e, KmsRootCreated):
            if e.ca_cert_pem and (not cluster or e.cluster == cluster):
                roots.append(e.ca_cert_pem)
            if e.temp_ca_cert_pem:
                temps.append(e.temp_ca_cert_pem)
    return "".join(dict.fromkeys(roots)), "".join(dict.fromkeys(temps))


def certs_of(pem_text: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem_text.encode()) if pem_text.strip() else []


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


class AppChainCheck:
    """The KMS roots a registration's chain must end at (`never`: CAs refused even if TLS was
    told to trust them, the temp CAs)."""

    def __init__(self, roots: Sequence[x509.Certificate], never: Sequence[x509.Certificate] = ()):
        refused = {_der(c) for c in never}
        kept = {_der(c): c for c in roots if _der(c) not in refused}
        self.roots = set(kept)
        self.never = refused
        # what TLS is told to trust: the roots only
        self.roots_pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode()
                                 for c in kept.values())  # fmt: skip

    @classmethod
    def from_pem(cls, roots_pem: str, never_pem: str = "") -> AppChainCheck:
        return cls(certs_of(roots_pem), certs_of(never_pem))

    def reason(self, chain: Sequence[bytes], app_id: bytes) -> str | None:
        """Why `chain` (leaf first, as TLS verified it) does not admit `app_id`; None when
        it does."""
        if chain and chain[-1] in self.never:
            return "the client certificate chains to the KMS temp CA, whose key is public"
        if len(chain) != 3:
            return (f"the client certificate chain has {len(chain)} certificates, not leaf, "
                    "app CA and KMS root: it was not issued by KMS SignCert")  # fmt: skip
        if chain[2] not in self.roots:
            return "the client certificate does not chain to the KMS root CA"
        try:
            leaf, app_ca, root = (x509.load_der_x509_certificate(c) for c in chain)
            return _shape(leaf, app_ca, root, app_id)
        except (ValueError, TypeError, TdxError) as e:
            return f"the client certificate chain does not parse: {e}"


def _shape(
    leaf: x509.Certificate, app_ca: x509.Certificate, root: x509.Certificate, app_id: bytes
) -> str | None:
    try:
        app_ca.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return "the app CA is not signed by the KMS root CA"
    try:
        constraints = app_ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        return "the certificate under the KMS root is no CA"
    if special_usage(app_ca) != APP_CA_USAGE:
        return f"the intermediate CA's usage is {special_usage(app_ca)!r}, not {APP_CA_USAGE!r}"
    ca_app = app_id_of(app_ca)
    if ca_app != app_id:
        named = ca_app.hex() if ca_app else "none"
        return f"the client certificate's app CA is app {named}'s, the CVM is app {app_id.hex()}"
    try:
        leaf.verify_directly_issued_by(app_ca)
    except (ValueError, TypeError, InvalidSignature):
        return "the client certificate is not signed by its app CA"
    if special_usage(leaf) != APP_CERT_USAGE:
        return f"the client certificate's usage is {special_usage(leaf)!r}, not {APP_CERT_USAGE!r}"
    if app_id_of(leaf) != app_id:
        return f"the client certificate does not name app {app_id.hex()}"
    return None
