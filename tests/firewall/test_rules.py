"""The guest egress allow list, the gateway's forwarding guard and their nftables text (pure:
no nft, no namespace)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pydstack.adapters.firewall import (
    PROTOCOLS,
    HostServices,
    RulesError,
    allowed,
    forward_guard,
    forward_table,
    processes_of,
    removal,
    resolver_ports,
    ruleset,
    url_ports,
)

SERVICES = HostServices(kms=(9100, 9101), gateway_registration=(8011,), wireguard=(51820,))


def test_every_field_of_the_allow_list_says_its_protocol() -> None:
    """A service added to HostServices without a protocol would silently open nothing."""
    assert set(PROTOCOLS) == set(HostServices.__struct_fields__)


def test_the_allow_list_opens_each_port_once_by_protocol() -> None:
    dns = HostServices(kms=(9100, 53), dns=(53,))
    assert allowed(SERVICES) == {"tcp": (8011, 9100, 9101), "udp": (51820,)}
    assert allowed(dns) == {"tcp": (53, 9100), "udp": (53,)}
    assert allowed(HostServices()) == {"tcp": (), "udp": ()}


def test_the_rules_close_every_host_address_to_the_user_but_the_listed_ports() -> None:
    """One table, replaced in one transaction; only QEMU's uid jumps to the guest chain, where
    replies and other machines pass, the listed ports pass, and the rest is rejected."""
    text = ruleset(999, SERVICES)
    assert text.startswith(removal())  # declare + delete: atomic replace, first time too
    assert "meta skuid 999 jump guest" in text
    guest = text[text.index("chain guest") :].splitlines()[1:-2]
    assert [r.strip() for r in guest] == [
        "ct state established,related accept",
        "fib daddr type != { local, broadcast, multicast } accept",
        "tcp dport { 8011, 9100, 9101 } accept",
        "udp dport { 51820 } accept",
        "counter reject with icmpx type admin-prohibited",
    ]
    assert "dport" not in ruleset(999, HostServices())  # nothing listed: nothing open


@pytest.mark.parametrize(
    ("uid", "services", "match"),
    [
        (0, SERVICES, "never root"),
        (999, HostServices(kms=(0,)), "kms: port 0"),
        (999, HostServices(wireguard=(70000,)), "wireguard: port 70000"),
    ],
)
def test_bad_input_is_refused_naming_the_field(
    uid: int, services: HostServices, match: str
) -> None:
    with pytest.raises(RulesError, match=match):
        ruleset(uid, services)


def test_ports_come_from_service_urls() -> None:
    urls = ["https://127.0.0.1:9100", "https://kms.example", "http://h:80", "10.0.0.1:8011",
            "https://127.0.0.1:9100/prpc"]  # fmt: skip
    assert url_ports(urls) == (9100, 443, 80, 8011)
    with pytest.raises(RulesError, match="not a host:port URL"):
        url_ports(["https://h:port"])


def test_a_loopback_resolver_keeps_dns_open() -> None:
    """slirp relays the guest's DNS from QEMU to the host's resolver: on loopback it is a host
    service like the others."""
    assert resolver_ports("nameserver 127.0.0.53\noptions edns0\n") == (53,)
    assert resolver_ports("# x\nnameserver ::1\n") == (53,)
    assert resolver_ports("nameserver 10.255.255.53\n") == ()
    assert resolver_ports("") == ()


def test_only_live_processes_of_the_user_keep_the_rules(tmp_path: Path) -> None:
    """A QEMU that exited after its supervisor died stays a zombie until init reaps it: it no
    longer reaches anything, so it must not keep the table in place."""
    for pid, state, uid in ((10, "S (sleeping)", 999), (11, "Z (zombie)", 999),
                            (12, "R (running)", 0)):  # fmt: skip
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "status").write_text(
            f"Name:\tqemu\nState:\t{state}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
        )
    (tmp_path / "self").mkdir()
    assert processes_of(999, tmp_path) == [10]


def test_the_gateway_guard_drops_forwarding_into_and_out_of_its_interface() -> None:
    """One table per interface, replaced atomically: in the forward hook, whatever arrives on
    the gateway's WireGuard interface, or would leave by it, is dropped (CVM to CVM and to the
    gateway's networks); the gateway's own connections (output) are not its business."""
    text = forward_guard("dgw0")
    assert forward_table("dgw0") == "pydstack_gw_dgw0"
    assert text.startswith("table inet pydstack_gw_dgw0\ndelete table inet pydstack_gw_dgw0\n")
    assert "type filter hook forward priority filter; policy accept;" in text
    assert '\t\tiifname "dgw0" counter drop\n' in text
    assert '\t\toifname "dgw0" counter drop\n' in text
    assert "hook output" not in text and "hook input" not in text
    assert forward_table("wg-a.1") == "pydstack_gw_wg_a_1"


@pytest.mark.parametrize("ifname", ["", "a" * 16, 'dgw0" accept', "dgw 0", "dgw0\n"])
def test_an_interface_name_nft_would_parse_is_refused(ifname: str) -> None:
    with pytest.raises(RulesError, match="interface name"):
        forward_guard(ifname)
