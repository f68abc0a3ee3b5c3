"""A custom domain's app address from DNS TXT, as dstack v0.5.11's gateway looks it up.

dstack (`gateway/src/proxy/tls_passthough.rs` `resolve_app_address`): for a server name under
no base domain, the TXT record ``<prefix>.<name>`` (``_dstack-app-address`` by default) holds
``<app_id>:<port>``; with ``app_address_ns_compat`` (on by default) the legacy
``_tapp-address.<name>`` is looked up at the same time and used when the first has none. Only
then ``<prefix>-wildcard.<parent>`` (the name without its first label). The first string of
the first record is taken; one that does not parse is an error, not a fall-through.

    resolve = DnsAppAddress()                       # the system's resolvers, as dstack
    proxy = await ProxyServer.create(config, certs, table, resolve_app_address=resolve)

Every lookup is bounded by ``timeout`` seconds in all; DNS answers are parsed by dnspython.
"""

from __future__ import annotations

import asyncio

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from pydstack.core.gateway import parse_app_address

PREFIX = "_dstack-app-address"  # dstack's `app_address_ns_prefix` default
LEGACY_PREFIX = "_tapp-address"  # dstack before its rename (tproxy -> gateway)


def txt_names(server_name: str, prefix: str = PREFIX, compat: bool = True) -> list[str]:
    """The names dstack asks first, in preference order (wildcard excluded)."""
    names = [f"{prefix}.{server_name}"]
    if compat and prefix != LEGACY_PREFIX:
        names.append(f"{LEGACY_PREFIX}.{server_name}")
    return names


def wildcard_name(server_name: str, prefix: str = PREFIX) -> str | None:
    """``<prefix>-wildcard.<parent>``, or None for a one-label name."""
    _, dot, parent = server_name.partition(".")
    return f"{prefix}-wildcard.{parent}" if dot and parent else None


class AppAddressError(Exception):
    """The TXT lookup failed or its record does not parse; the message names the name."""


class DnsAppAddress:
    """An ``AppAddressResolver``: ``await resolve(name)`` is ``(app_id, port)`` or None."""

    def __init__(
        self,
        *,
        prefix: str = PREFIX,
        compat: bool = True,
        nameservers: list[tuple[str, int]] | None = None,
        timeout: float = 5.0,  # dstack's `timeouts.dns_resolve`
    ) -> None:
        self.prefix, self.compat, self.timeout = prefix, compat, timeout
        try:
            self._resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
        except dns.resolver.NoResolverConfiguration as e:
            raise AppAddressError(f"no DNS resolver configured (resolv.conf): {e}") from None
        if nameservers:
            self._resolver.nameservers = [ip for ip, _ in nameservers]
            self._resolver.port = nameservers[0][1]
        self._resolver.lifetime = timeout

    async def __call__(self, server_name: str) -> tuple[str, int] | None:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._resolve(server_name.lower().rstrip("."))
        except TimeoutError:
            raise AppAddressError(f"TXT lookup for {server_name} timed out") from None

    async def _resolve(self, name: str) -> tuple[str, int] | None:
        names = txt_names(name, self.prefix, self.compat)
        found = await asyncio.gather(*(self._first(n, quiet=True) for n in names))
        for txt_name, value in zip(names, found, strict=True):
            if value is not None:
                return _parsed(txt_name, value)
        wildcard = wildcard_name(name, self.prefix)
        if wildcard is None:
            return None
        value = await self._first(wildcard, quiet=False)
        return None if value is None else _parsed(wildcard, value)

    async def _first(self, txt_name: str, *, quiet: bool) -> bytes | None:
        """The first string of the first TXT record at `txt_name`; None when there is none.
        A failed lookup is None when `quiet` (dstack skips it), else `AppAddressError`."""
        try:
            answer = await self._resolver.resolve(txt_name, dns.rdatatype.TXT)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException as e:
            if quiet:
                return None
            raise AppAddressError(f"TXT lookup of {txt_name} failed: {e}") from None
        for rdata in answer:
            strings = getattr(rdata, "strings", ())
            return bytes(strings[0]) if strings else None
        return None


def _parsed(txt_name: str, value: bytes) -> tuple[str, int]:
    try:
        return parse_app_address(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise AppAddressError(f"TXT {txt_name}: {str(e)[:200]}") from None
