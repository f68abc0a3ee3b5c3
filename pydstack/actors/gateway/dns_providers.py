"""The DNS-01 providers a gateway node orders certificates with, by the name a domain gives
(``GatewayDomainAdded.dns_provider``; ``pydstack gateway add-domain --dns-provider NAME``).

``rfc2136`` (a zone's primary taking TSIG-signed updates) and ``challtestsrv`` (pebble's test
DNS) are registered under their names; the default ``""`` is RFC 2136 when the node has it,
else challtestsrv. A node with neither only serves certificates::

    providers = dns_providers(rfc2136=Rfc2136Config("ns1.example.com", "example.com",
                                                    "acme-key", "hmac-sha256", "tsig.secret"))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:  # the ACME adapter (certbot's acme, dnspython) loads only when a node uses it
    from pydstack.adapters.acme import DnsProvider
    from pydstack.adapters.acme.rfc2136 import Rfc2136Config

F = TypeVar("F", bound=Callable[..., Any])
_META = "pydstack.rfc2136"
# = adapters.acme.rfc2136.ALGORITHMS (a test keeps them equal), without importing the adapter
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1")


def dns_providers(
    challtestsrv: str = "", rfc2136: Rfc2136Config | None = None
) -> dict[str, DnsProvider]:
    """Providers by name; reads the TSIG secret file now (``DnsError``, one line, if unusable)."""
    from pydstack.adapters.acme import ChallTestSrvDns

    named: dict[str, DnsProvider] = {}
    if challtestsrv:
        named["challtestsrv"] = ChallTestSrvDns(challtestsrv)
    if rfc2136 is not None:
        named["rfc2136"] = rfc2136.open()
    if named:
        named[""] = named.get("rfc2136") or named["challtestsrv"]
    return named


def rfc2136_options(prefix: str) -> Callable[[F], F]:
    """Click options ``--{prefix}rfc2136-server/-zone/-tsig-name/-tsig-algorithm/
    -tsig-secret-file`` (the secret only as a file: argv is readable by every local user),
    collected for :func:`rfc2136_config` rather than passed as parameters."""

    def keep(field: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
        def callback(ctx: click.Context, _p: click.Parameter, value: Any) -> Any:
            ctx.meta.setdefault(_META, {})[field] = value
            return value

        return callback

    flag = f"--{prefix}rfc2136"
    options = [
        click.option(f"{flag}-server", metavar="HOST[:PORT]", expose_value=False,
                     callback=keep("server"),
                     help="DNS-01 by RFC 2136 updates (TSIG-signed) to this primary server"),
        click.option(f"{flag}-zone", metavar="ZONE", expose_value=False, callback=keep("zone"),
                     help="the zone the _acme-challenge names are in"),
        click.option(f"{flag}-tsig-name", metavar="NAME", expose_value=False,
                     callback=keep("tsig_name"), help="the TSIG key's name"),
        click.option(f"{flag}-tsig-algorithm", type=click.Choice(TSIG_ALGORITHMS),
                     default="hmac-sha256", show_default=True, expose_value=False,
                     callback=keep("tsig_algorithm")),
        click.option(f"{flag}-tsig-secret-file", type=click.Path(dir_okay=False),
                     expose_value=False, callback=keep("tsig_secret_file"),
                     help="file (mode 0600) holding the TSIG key's base64 secret"),
    ]  # fmt: skip

    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def rfc2136_config(ctx: click.Context, prefix: str) -> Rfc2136Config | None:
    """The options of :func:`rfc2136_options`: None when no server is named, else a config
    whose secret file was read and checked (a one-line ``click.UsageError`` otherwise)."""
    from pydstack.adapters.acme import DnsError
    from pydstack.adapters.acme.rfc2136 import Rfc2136Config

    given = dict(ctx.meta.get(_META, {}))
    flag = f"--{prefix}rfc2136"
    if not given.get("server"):
        if given.get("zone") or given.get("tsig_name") or given.get("tsig_secret_file"):
            raise click.UsageError(f"{flag}-* options need {flag}-server")
        return None
    for field in ("zone", "tsig_name", "tsig_secret_file"):
        if not given.get(field):
            raise click.UsageError(f"{flag}-server needs {flag}-{field.replace('_', '-')}")
    config = Rfc2136Config(
        server=given["server"], zone=given["zone"], tsig_name=given["tsig_name"],
        tsig_algorithm=given["tsig_algorithm"], tsig_secret_file=given["tsig_secret_file"],
    )  # fmt: skip
    try:
        config.open()
    except DnsError as exc:
        raise click.UsageError(str(exc)) from None
    return config
