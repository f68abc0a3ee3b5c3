"""The RegisterCvm server certificate from the KMS, as dstack's gateway gets its own.

dstack's gateway is a CVM app: at start it asks its guest agent for an RA-TLS key
(`gateway/src/main.rs` `gen_prod_certs`: subject "dstack-gateway", alt names its
`rpc_domain` and `my_url`'s host, server and client auth, with app info), which the agent
has the KMS sign under the app's CA (`gen_debug_certs` sends that very CSR to SignCert
itself). A dstack v0.5.11 guest checks it before RegisterCvm (`dstack-util`
`GatewayContext::create_gateway_client`): TLS must chain to the KMS root (GetTempCaCert's
`ca_cert`, no system roots, hostname checked), and `AppIdValidator` wants the leaf's app id
extension (OID 1.3.6.1.4.1.62397.1.3) hex within GetAppKey's `gateway_app_id` (`any` skips
both checks; not something we ever hand out).

A pydstack node does the same: a fresh P-256 key, evidence binding it from wherever the
node's TD evidence comes from (a guest agent's `Attest` when the node runs in a CVM, or an
`Attester` given by the caller: the simulator on a simulated platform, announced), then
SignCert with ``ext_app_info`` and ``ext_quote``. The answer counts only as leaf (this key),
the app's CA (``app:ca``, this app id), the KMS root it was told to expect
(`pydstack_guest.cert_client.check_chain`), so a host that is not the KMS cannot hand the
node a certificate. The KMS signs only if its authorization admits the node's TD as an app
of `app_id` (the app id its event log measures): the node cannot name an app id it is not.

    chain_pem, key_pem = await kms_app_cert(KmsAppCert(kms_url=..., kms_root_pem=...,
                                            app_id=bytes.fromhex(gw_app), alt_names=(host,)),
                                            GuestAgentAttester("/var/run/dstack.sock"))
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.adapters.tdx.attestation import encode_attestation
from pydstack.adapters.tdx.ratls import Attester, ratls_report_data
from pydstack.core.kms import CertConfig
from pydstack_guest.cert_client import CertRequestError, request_certificate
from pydstack_guest.provider import AppKeys

_log = structlog.get_logger("pydstack.gateway.app_cert")
SUBJECT = "dstack-gateway"  # what dstack's gateway asks its agent for


class AppCertError(ValueError):
    """The node got no KMS certificate for its gateway app: one line, what and why."""


@dataclass(frozen=True, slots=True)
class KmsAppCert:
    """Where the node's RegisterCvm certificate comes from: the KMS at `kms_url` (TLS and the
    answer's chain must end at `kms_root_pem`, GetMeta's `ca_cert`), for the gateway app
    `app_id` (what the KMS's GetMeta / GetAppKey name as `gateway_app_id`)."""

    kms_url: str
    kms_root_pem: str
    app_id: bytes
    alt_names: tuple[str, ...] = ()
    # the node's TD's vm_config, as a CVM sends it with SignCert; "": the one the evidence's
    # sys-config names (what a guest agent's Attest carries)
    vm_config: str = ""
    guest_agent: str | None = None  # the dstack.sock of the CVM the node runs in


def _vm_config_of(sys_config: str) -> str:
    try:
        value = json.loads(sys_config).get("vm_config", "") if sys_config else ""
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


async def kms_app_cert(
    spec: KmsAppCert, attester: Attester, *, timeout: float = 30.0
) -> tuple[str, str]:
    """(chain PEM leaf-first, key PEM) the KMS issued to this node as app `spec.app_id`."""
    if len(spec.app_id) != 20:
        raise AppCertError(f"gateway app id must be 20 bytes, not {len(spec.app_id)}")
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        att = await attester.attest(ratls_report_data(key.public_key()))
    except Exception as e:  # any failure to attest stops the start, in one line
        raise AppCertError(f"gateway node cannot attest its certificate key: {e}") from None
    config = CertConfig(subject=SUBJECT, subject_alt_names=spec.alt_names,
                        usage_server_auth=True, usage_client_auth=True, ext_quote=True,
                        ext_app_info=True)  # fmt: skip
    vm_config = spec.vm_config or _vm_config_of(att.config)
    keys = AppKeys(k256_key=b"", k256_signature=b"", ca_cert_pem="", ca_key_pem="",
                   kms_url=spec.kms_url.rstrip("/"), kms_ca_cert_pem=spec.kms_root_pem)  # fmt: skip
    try:
        chain = await request_certificate(keys, key, config, encode_attestation(att),
                                          vm_config=vm_config, app_id=spec.app_id,
                                          timeout=timeout)  # fmt: skip
    except CertRequestError as e:
        raise AppCertError(f"gateway app {spec.app_id.hex()}: {e}") from None
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    _log.info("registration certificate from the KMS", app_id=spec.app_id.hex(),
              kms=spec.kms_url, alt_names=list(spec.alt_names))  # fmt: skip
    return "".join(p if p.endswith("\n") else p + "\n" for p in chain), key_pem
