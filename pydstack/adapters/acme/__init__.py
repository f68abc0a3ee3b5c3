"""ACME (RFC 8555) for the gateway's wildcard certificates: the account and orders on certbot's
``acme`` library, DNS-01 providers, and key material sealed to the cluster key.

    client = await AcmeClient.open(AcmeConfig(directory_url), account_key_pem)
    issued = await client.issue(("*.example.com", "example.com"), new_private_key_pem(), dns)
"""

from .client import AcmeClient, AcmeConfig, Issued, certificate_times, thumbprint
from .dns import ChallTestSrvDns, DnsProvider
from .errors import AcmeError, DnsError
from .keys import create_cluster_secret, load_cluster_key, new_private_key_pem, seal_secret
from .rfc2136 import Rfc2136Config, Rfc2136Dns

__all__ = [
    "AcmeClient", "AcmeConfig", "AcmeError", "ChallTestSrvDns", "DnsError", "DnsProvider",
    "Issued", "Rfc2136Config", "Rfc2136Dns", "certificate_times", "create_cluster_secret",
    "load_cluster_key", "new_private_key_pem", "seal_secret", "thumbprint",
]  # fmt: skip
