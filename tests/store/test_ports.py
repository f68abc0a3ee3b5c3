"""free_port picks ports no outgoing connection can take before the child binds them."""

from __future__ import annotations

import socket
from collections import deque

import pytest

from pydstack.adapters import ports
from pydstack.adapters.ports import PICK_RANGE, free_port


def _ephemeral_range() -> tuple[int, int]:
    lo, hi = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
    return int(lo), int(hi)


def test_ports_are_below_the_ephemeral_range_and_outside_the_vmm_host_ports() -> None:
    lo, _ = _ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert all(PICK_RANGE[0] <= p <= PICK_RANGE[1] for p in ports)
    assert max(ports) < lo
    assert not any(20000 <= p <= 29999 for p in ports)
    assert len(set(ports)) == len(ports), "a port was handed out twice before anyone bound it"


def test_only_an_unbound_port_is_picked_and_a_full_range_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 10-port range of which 9 are held by listeners: the one left is the only answer.
    lo, held = _hold_window(9)
    monkeypatch.setattr(ports, "PICK_RANGE", (lo, lo + 9))
    monkeypatch.setattr(ports, "_recent", deque(maxlen=512))
    try:
        assert free_port() == lo + 9
        s = socket.socket()
        s.bind(("127.0.0.1", lo + 9))
        held.append(s)
        with pytest.raises(OSError, match=f"no free port in {lo}-{lo + 9}"):
            free_port()
    finally:
        for s in held:
            s.close()


def _hold_window(n: int) -> tuple[int, list[socket.socket]]:
    """Listeners on n consecutive ports followed by one free port; (first port, sockets)."""
    for lo in range(PICK_RANGE[0], PICK_RANGE[1] - n, n + 1):
        held: list[socket.socket] = []
        try:
            for p in range(lo, lo + n + 1):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
            held.pop().close()  # the last one stays free
            for s in held:
                s.listen()
            return lo, held
        except OSError:
            for s in held:
                s.close()
    raise AssertionError("no window of free ports")


def test_udp_ports_are_checked_with_udp() -> None:
    port = free_port(kind=socket.SOCK_DGRAM)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))  # would raise if the picker had returned a bound UDP port
