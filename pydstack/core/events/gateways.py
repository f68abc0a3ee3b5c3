"""Events of a gateway cluster (``dstack.gateway.<cluster>``) and of CVMs (``dstack.cvm.<id>``).

The cluster aggregate is the one place where tunnel IPs are handed out: node membership and
the IP ledger (``TunnelIpAllocated`` / ``TunnelIpReleased``) are appended there with optimistic
concurrency, so two writers can never hold the same address. Each registration also appends
``CvmRegistered`` on the CVM's own subject in the same atomic commit; recycling and removal
append ``TunnelIpReleased`` + ``CvmRecycled`` / ``CvmRemoved`` the same way.

``cluster == ""`` on node events written before the field existed means the default cluster.
"""

from __future__ import annotations

import msgspec

from ._base import Event


class PortAttrs(msgspec.Struct, frozen=True, kw_only=True):
    """dstack's ``PortAttrs``: per-port behaviour the app asks of the gateway."""

    port: int
    pp: bool = False  # send a PROXY protocol header on connections to this port


class GatewayNodeJoined(Event, tag="GatewayNodeJoined", frozen=True):
    node_id: str
    wg_public_key: str
    tunnel_ip: str
    endpoint: str
    base_domain: str
    cluster: str = ""  # added: the cluster aggregate it joined ("" = default)
    url: str = ""  # added: the node's RPC URL (dstack's GatewayNodeInfo.url)
    # added (issue 15.7): what carries its tunnels, "kernel" or "userspace" (wireguard-go),
    # and one line why ("" on joins before the fields)
    wg_backend: str = ""
    wg_backend_reason: str = ""


class GatewayNodeDown(Event, tag="GatewayNodeDown", frozen=True):
    node_id: str
    reason: str = ""
    cluster: str = ""  # added


class GatewayNodeUp(Event, tag="GatewayNodeUp", frozen=True):
    node_id: str
    cluster: str = ""  # added


class TunnelIpAllocated(Event, tag="TunnelIpAllocated", frozen=True):
    """The cluster's IP ledger: ``instance_id`` holds ``tunnel_ip`` with this WireGuard key.

    Written for every admission, also a re-registration that keeps its address (a renewal);
    the instance's app binding starts with its first allocation and never changes.
    """

    cluster: str
    instance_id: str
    app_id: str
    wg_public_key: str
    tunnel_ip: str
    # added (issue 14): the attested identity holding the lease; a lease moves to another
    # key only for the same one. "" on entries written before (they match anything).
    compose_hash: str = ""
    mr_system: str = ""
    # added (issue 14): the lease moved to a compose the app's own events on the log allow
    # (an upgrade of the same instance), not the compose that held it
    app_upgrade: bool = False


class TunnelIpReleased(Event, tag="TunnelIpReleased", frozen=True):
    """The ledger entry of ``instance_id`` ends; its address may be handed out again."""

    cluster: str
    instance_id: str
    tunnel_ip: str
    reason: str = ""  # "recycled" | "removed" | free text


class CvmRegistered(Event, tag="CvmRegistered", frozen=True):
    app_id: str
    instance_id: str
    compose_hash: str
    wg_public_key: str
    tunnel_ip: str
    # "allow-all": any port may be proxied; "restrict": only the ports listed in `ports`
    # (dstack's restrict_mode). The field kept its name and type when `ports` was added.
    port_policy: str = "allow-all"
    attestation_hash: str = ""
    ports: tuple[PortAttrs, ...] = ()  # added: dstack's PortPolicy.ports
    cluster: str = ""  # added: the cluster whose ledger admitted it ("" = default)
    mr_system: str = ""  # added (issue 14): the attested OS + key provider measurement


class CvmLiveness(Event, tag="CvmLiveness", frozen=True):
    instance_id: str
    node_id: str
    last_handshake: int  # unix seconds
    rx_bytes: int = 0
    tx_bytes: int = 0


class CvmRecycled(Event, tag="CvmRecycled", frozen=True):
    instance_id: str
    reason: str = ""


class CvmRemoved(Event, tag="CvmRemoved", frozen=True):
    """An operator (or the VM's removal) took the instance out of every gateway."""

    instance_id: str
    reason: str = ""


class CvmRegistrationRefused(Event, tag="CvmRegistrationRefused", frozen=True):
    """An attested caller asked to register and was refused; ``code`` is a short label."""

    instance_id: str
    app_id: str
    code: str  # bad_key | key_in_use | app_mismatch | unauthorized | pool_exhausted | ...
    reason: str
    wg_public_key: str = ""
    compose_hash: str = ""
    attestation_hash: str = ""
    cluster: str = ""


# -- domains and certificates -----------------------------------------------------------------
# A base domain is its own aggregate, ``dstack.gateway.<cluster>:domain:<domain, '.' -> '_'>``
# (``core.gateway.certs.domain_subject``), so certificate work never contends with the IP
# ledger; an ACME account is ``dstack.gateway.<cluster>:acme:<hash of the directory URL>``.
# Private keys appear only sealed to the cluster key (``core.gateway.sealing``), bound to the
# event id they travel in.


class GatewayDomainAdded(Event, tag="GatewayDomainAdded", frozen=True):
    """An operator asked the cluster to serve ``domain`` (and ``*.domain``) with ACME certs."""

    cluster: str
    domain: str  # lower-case, no trailing dot
    acme_directory: str  # the ACME directory URL
    contact: tuple[str, ...] = ()  # account contacts ("mailto:ops@example.com")
    dns_provider: str = ""  # name of the DNS-01 provider the nodes use ("" = their default)
    wildcard: bool = True  # order ``*.domain`` besides ``domain``


class GatewayDomainRemoved(Event, tag="GatewayDomainRemoved", frozen=True):
    cluster: str
    domain: str
    reason: str = ""


class AcmeAccountCreated(Event, tag="AcmeAccountCreated", frozen=True):
    """The cluster's account at one ACME directory; every node signs orders with this key."""

    cluster: str
    acme_directory: str
    account_uri: str
    sealed_key: bytes  # the account's PKCS#8 PEM private key, sealed to the cluster key
    thumbprint: str = ""  # RFC 7638 JWK thumbprint of the account key (hex)


class CertificateRenewalStarted(Event, tag="CertificateRenewalStarted", frozen=True):
    """``node_id`` claims the next order for ``domain``; the others wait for its outcome."""

    cluster: str
    domain: str
    node_id: str
    attempt: str  # id of this attempt; the outcome names it
    reason: str = ""  # "missing" | "expiring" | "retry"


class CertificateIssued(Event, tag="CertificateIssued", frozen=True):
    cluster: str
    domain: str
    attempt: str
    names: tuple[str, ...]  # the certificate's DNS names ("*.example.com", "example.com")
    cert_chain_pem: str  # leaf first, then the intermediates, as the CA sent it
    not_before: int  # unix seconds
    not_after: int  # unix seconds
    sealed_key: bytes  # the certificate's PKCS#8 PEM private key, sealed to the cluster key


class CertificateRenewalFailed(Event, tag="CertificateRenewalFailed", frozen=True):
    cluster: str
    domain: str
    attempt: str
    node_id: str
    error: str
