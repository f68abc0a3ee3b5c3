"""DNS-01 providers: publish and remove the ``_acme-challenge`` TXT records of an order.

A provider is two verbs (:class:`DnsProvider`). ``ChallTestSrvDns`` drives
pebble-challtestsrv's management API (tests, local setups). A real provider (Cloudflare,
Route 53, RFC 2136, ...) implements the same protocol: ``add_txt`` creates one record and
returns once the provider accepted it, ``remove_txt`` deletes the record with that value,
and ``propagation_s`` says how long authoritative servers take to serve a new record, which
the client waits before asking the CA to validate. For Cloudflare that is a
``POST /zones/<zone>/dns_records {"type": "TXT", "name": name, "content": value}`` and a
``DELETE`` of the returned record id; keep its API token in the node's configuration, never
on the log. The domain's ``dns_provider`` name picks the provider from the mapping a node is
started with (``actors.gateway.certs.CertKeeper(providers=...)``). Usage::

    dns = ChallTestSrvDns("http://127.0.0.1:8055")
    await dns.add_txt("_acme-challenge.example.com.", "token-digest")
    await dns.remove_txt("_acme-challenge.example.com.", "token-digest")
"""

from __future__ import annotations

from typing import Protocol

import aiohttp

from .errors import DnsError


class DnsProvider(Protocol):
    propagation_s: float

    async def add_txt(self, name: str, value: str) -> None:
        """Publish a TXT record ``value`` at ``name`` (a fully qualified name)."""
        ...

    async def remove_txt(self, name: str, value: str) -> None:
        """Remove the TXT record ``value`` at ``name`` (no error if it is already gone)."""
        ...


def fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


class ChallTestSrvDns:
    """pebble-challtestsrv's mock DNS: ``/set-txt`` adds a value, ``/clear-txt`` clears the
    name. Both challenges of a wildcard order share one name, so removal clears the name
    once its last value is removed."""

    propagation_s: float = 0.0

    def __init__(self, management_url: str, *, timeout_s: float = 5.0) -> None:
        self.url = management_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._values: dict[str, set[str]] = {}

    async def _post(self, path: str, body: dict[str, str]) -> None:
        try:
            async with (
                aiohttp.ClientSession(timeout=self.timeout) as http,
                http.post(f"{self.url}{path}", json=body) as resp,
            ):
                if resp.status != 200:
                    text = (await resp.text())[:200]
                    raise DnsError(f"challtestsrv {path} answered {resp.status}: {text}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DnsError(f"challtestsrv at {self.url} unreachable: {exc}") from None

    async def add_txt(self, name: str, value: str) -> None:
        await self._post("/set-txt", {"host": fqdn(name), "value": value})
        self._values.setdefault(fqdn(name), set()).add(value)

    async def remove_txt(self, name: str, value: str) -> None:
        left = self._values.get(fqdn(name), set())
        left.discard(value)
        if not left:
            self._values.pop(fqdn(name), None)
            await self._post("/clear-txt", {"host": fqdn(name)})
