"""Pure gateway logic: ClientHello parsing, dstack's SNI rules, backend picking, PROXY headers."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pydstack.core.gateway import (
    ClientHello,
    ClientHelloError,
    IncompleteClientHello,
    Instance,
    MalformedClientHello,
    Mode,
    PortPolicy,
    PortRule,
    Refusal,
    RefusalReason,
    Route,
    RouteError,
    RoutingTable,
    Selection,
    encode_proxy_header,
    parse_app_address,
    parse_client_hello,
    parse_route,
    pick_backends,
)
from pydstack.core.gateway.sni import _parse_checked, _parse_one_record


def real_client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of Python's own TLS client (OpenSSL), captured through memory BIOs."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def reframe(hello: bytes, cut: int) -> bytes:
    """The same handshake message split into two TLS records at ``cut``."""
    body = hello[5:]
    head = hello[:3]
    first, second = body[:cut], body[cut:]
    return (
        head
        + len(first).to_bytes(2, "big")
        + first
        + head
        + len(second).to_bytes(2, "big")
        + second
    )


HELLO = real_client_hello("abc-8443s.app.example.com", ["h2", "http/1.1"])


def test_real_client_hello_gives_sni_and_alpn() -> None:
    """OpenSSL's ClientHello yields its server name, ALPN list and exact length."""
    hello = parse_client_hello(HELLO + b"trailing application bytes")
    assert hello.server_name == "abc-8443s.app.example.com"
    assert hello.alpn == ("h2", "http/1.1")
    assert hello.length == len(HELLO)


def test_client_hello_without_sni() -> None:
    """A client that sends no SNI parses with server_name None."""
    assert parse_client_hello(real_client_hello(None)).server_name is None


@pytest.mark.parametrize("cut", [1, 3, 40, 100])
def test_client_hello_split_over_records(cut: int) -> None:
    """A ClientHello fragmented over two records is reassembled."""
    framed = reframe(HELLO, cut)
    hello = parse_client_hello(framed)
    assert hello.server_name == "abc-8443s.app.example.com" and hello.length == len(framed)


def test_every_truncation_is_incomplete() -> None:
    """Each strict prefix (whole-record or split) asks for more bytes, never misparses."""
    for data in (HELLO, reframe(HELLO, 50)):
        for n in range(len(data)):
            with pytest.raises(IncompleteClientHello):
                parse_client_hello(data[:n])


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x02\x00\x00\x05hello",  # not TLS version 3.x
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # ServerHello, not ClientHello
        b"\x16\x03\x01\x00\x04\x01\x00\x00\x00",  # empty ClientHello body
        b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # 16 MiB declared ClientHello
    ],
)
def test_malformed_inputs(data: bytes) -> None:
    """Plain HTTP, empty records, wrong versions/types and absurd sizes are malformed."""
    with pytest.raises(MalformedClientHello):
        parse_client_hello(data)


def test_non_ascii_or_invalid_server_name_is_malformed() -> None:
    """A server name that is not an ASCII host name is refused."""
    bad = HELLO.replace(b"abc-8443s", b"ab\xff-8443s")
    with pytest.raises(MalformedClientHello):
        parse_client_hello(bad)
    with pytest.raises(MalformedClientHello):
        parse_client_hello(HELLO.replace(b"abc-8443s", b"abc 8443s"))


@given(st.binary(max_size=600))
def test_random_bytes_only_raise_client_hello_errors(data: bytes) -> None:
    """Random input either parses or raises ClientHelloError, nothing else."""
    try:
        parse_client_hello(data)
    except ClientHelloError:
        pass


@given(st.integers(0, len(HELLO) - 1), st.integers(0, 255))
def test_mutated_hellos_only_raise_client_hello_errors(pos: int, value: int) -> None:
    """One byte of a real ClientHello changed: a result or a ClientHelloError."""
    data = bytearray(HELLO)
    data[pos] = value
    try:
        parse_client_hello(bytes(data))
    except ClientHelloError:
        pass


def _checked(data: bytes) -> ClientHello | None:
    try:
        return _parse_checked(data)
    except ClientHelloError:
        return None


@given(st.lists(st.tuples(st.integers(0, len(HELLO) - 1), st.integers(0, 255)), max_size=3))
def test_one_record_fast_path_agrees_with_the_checked_parser(edits: list[tuple[int, int]]) -> None:
    """The fast path accepts only what the checked parser accepts, with the same result."""
    data = bytearray(HELLO)
    for pos, value in edits:
        data[pos] = value
    fast = _parse_one_record(bytes(data))
    assert fast is None or fast == _checked(bytes(data))
    assert _parse_one_record(HELLO) == _checked(HELLO)  # and it does take a real one


BASES = ("app.example.com", "other.test")


@pytest.mark.parametrize(
    ("host", "route"),
    [
        ("abc.app.example.com", Route("abc", 80, Mode.TERMINATE, "app.example.com")),
        ("abc-8080.app.example.com", Route("abc", 8080, Mode.TERMINATE, "app.example.com")),
        ("abc-s.app.example.com", Route("abc", 443, Mode.PASSTHROUGH, "app.example.com")),
        ("abc-8443s.app.example.com", Route("abc", 8443, Mode.PASSTHROUGH, "app.example.com")),
        ("abc-g.app.example.com", Route("abc", 80, Mode.H2, "app.example.com")),
        ("abc-50051g.other.test", Route("abc", 50051, Mode.H2, "other.test")),
        ("ABC-443S.App.Example.COM.", Route("abc", 443, Mode.PASSTHROUGH, "app.example.com")),
        ("abc-.app.example.com", Route("abc", 80, Mode.TERMINATE, "app.example.com")),
        ("abcs.app.example.com", Route("abcs", 80, Mode.TERMINATE, "app.example.com")),
    ],
)
def test_dstack_route_shapes(host: str, route: Route) -> None:
    """<id>[-[port][s|g]].<base>: dstack's defaults (80, or 443 for s) and suffixes."""
    assert parse_route(host, BASES) == route


@pytest.mark.parametrize(
    "host",
    [
        "abc-8080sg.app.example.com",
        "abc-8080gs.app.example.com",
        "abc-1-2.app.example.com",
        "abc-99999.app.example.com",
        "abc-0.app.example.com",
        "abc-x.app.example.com",
        "-443s.app.example.com",
        "a+b-443s.app.example.com",
    ],
)
def test_bad_route_shapes(host: str) -> None:
    """Both suffixes, extra dashes, bad ports and empty ids are RouteErrors."""
    with pytest.raises(RouteError):
        parse_route(host, BASES)


@pytest.mark.parametrize(
    "host", ["app.example.com", "x.y.app.example.com", "abc.example.org", "abc.notapp.example.com"]
)
def test_hosts_outside_base_domains_are_not_routes(host: str) -> None:
    """Only a single label directly under a base domain is routed; others are custom domains."""
    assert parse_route(host, BASES) is None


def test_app_address_txt() -> None:
    """The _dstack-app-address TXT value is <app_id>:<port>."""
    assert parse_app_address("3327603e03f5bd1f830812ca4a789277fc31f577:8090") == (
        "3327603e03f5bd1f830812ca4a789277fc31f577",
        8090,
    )
    for bad in ("noport", "x:", "x:70000", ":80"):
        with pytest.raises(RouteError):
            parse_app_address(bad)


NOW = 1_000_000.0
RESTRICTED = PortPolicy(restrict=True, rules=(PortRule(443, proxy_protocol=2), PortRule(8080)))
TABLE = RoutingTable.build(
    [
        Instance("i1", "app", "10.4.0.1", NOW - 10),
        Instance("i2", "app", "10.4.0.2", NOW - 5),
        Instance("i3", "app", "10.4.0.3", NOW - 3000),  # stale
        Instance("i4", "app", "10.4.0.4", None),  # never shook hands
        Instance("i5", "app", "10.4.0.5", NOW - 1),
        Instance("i6", "app", "10.4.0.6", NOW - 20),
        Instance("r1", "locked", "10.4.1.1", NOW - 1, RESTRICTED),
    ],
    base_domains=BASES,
)


def test_app_id_picks_freshest_top_n() -> None:
    """An app id yields its instances with fresh handshakes, newest first, at most top_n."""
    picked = pick_backends(Route("app", 80, Mode.TERMINATE), TABLE, NOW, top_n=3)
    assert isinstance(picked, Selection) and picked.kind == "app"
    assert [b.instance_id for b in picked.backends] == ["i5", "i2", "i1"]
    assert all(b.port == 80 and b.proxy_protocol == 0 for b in picked.backends)


def test_instance_id_goes_direct_even_when_stale() -> None:
    """An instance id reaches exactly that instance, whatever its handshake age."""
    picked = pick_backends(Route("i3", 8080, Mode.PASSTHROUGH), TABLE, NOW)
    assert isinstance(picked, Selection)
    assert picked.kind == "instance" and picked.app_id == "app"
    assert [(b.instance_id, b.ip, b.port) for b in picked.backends] == [("i3", "10.4.0.3", 8080)]


def test_unknown_and_dead_apps_are_refused() -> None:
    """Unknown ids and apps whose instances are all stale are refused with distinct reasons."""
    unknown = pick_backends(Route("nope", 80, Mode.TERMINATE), TABLE, NOW)
    assert isinstance(unknown, Refusal) and unknown.reason is RefusalReason.UNKNOWN_ID
    dead = pick_backends(Route("app", 80, Mode.TERMINATE), TABLE, NOW + 10_000)
    assert isinstance(dead, Refusal) and dead.reason is RefusalReason.NO_LIVE_INSTANCE


def test_port_policy_fails_closed_and_carries_proxy_protocol() -> None:
    """Restrict mode refuses unlisted ports (by app or instance id) and sets the PROXY version."""
    for ident in ("locked", "r1"):
        denied = pick_backends(Route(ident, 22, Mode.TERMINATE), TABLE, NOW)
        assert isinstance(denied, Refusal) and denied.reason is RefusalReason.PORT_DENIED
    ok = pick_backends(Route("locked", 443, Mode.PASSTHROUGH), TABLE, NOW)
    assert isinstance(ok, Selection) and ok.backends[0].proxy_protocol == 2
    plain = pick_backends(Route("r1", 8080, Mode.TERMINATE), TABLE, NOW)
    assert isinstance(plain, Selection) and plain.backends[0].proxy_protocol == 0


def test_duplicate_instances_are_rejected() -> None:
    """A table cannot hold the same instance id twice."""
    with pytest.raises(ValueError, match="twice"):
        RoutingTable.build([Instance("i", "a", "10.0.0.1"), Instance("i", "b", "10.0.0.2")])


def test_proxy_protocol_headers() -> None:
    """v1 text and v2 binary headers for IPv4, IPv6 and unknown addresses."""
    src, dst = ("203.0.113.7", 51234), ("10.4.0.1", 443)
    assert encode_proxy_header(1, src, dst) == b"PROXY TCP4 203.0.113.7 10.4.0.1 51234 443\r\n"
    assert encode_proxy_header(1, None, dst) == b"PROXY UNKNOWN\r\n"
    v2 = encode_proxy_header(2, src, dst)
    assert v2[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and v2[12:16] == b"\x21\x11\x00\x0c"
    assert v2[16:] == bytes([203, 0, 113, 7, 10, 4, 0, 1]) + (51234).to_bytes(2, "big") + (
        443
    ).to_bytes(2, "big")
    v6 = encode_proxy_header(2, ("::1", 1), ("::2", 2))
    assert v6[13] == 0x21 and int.from_bytes(v6[14:16], "big") == 36
    assert encode_proxy_header(2, None, None)[12:] == b"\x20\x00\x00\x00"
    assert encode_proxy_header(0, src, dst) == b""
