"""Pure parts of the WireGuard adapter: keys, UAPI text, and the peer diff."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pydstack.adapters.wireguard import (
    DeviceConfig,
    DeviceStatus,
    KeyFormatError,
    PeerConfig,
    PeerOp,
    PrivateKey,
    PublicKey,
    UapiError,
    UapiProtocolError,
    WireGuardError,
    apply_ops,
    b64_to_hex,
    check_set_response,
    diff_device,
    diff_peers,
    hex_to_b64,
    parse_get,
    render_set,
)

K1 = PrivateKey.from_b64("CK6MO5dRoGmRaaLu/T1kzVZq6wRMEZkIY1/JUTQ0elU=")
P1 = "UkywmOf5B51/kfceopGrIW68hIpZrDHhd3a5tyBujkk="  # `wg pubkey` of K1
P2 = PrivateKey.from_b64("YFSTlA5LykuHzEoRmBWD2KtkxFHnP6kJy5QJLeH6Un0=").public_key().b64


def test_public_key_matches_wg_tools() -> None:
    """Our X25519 public key is the one `wg pubkey` derives from the same private key."""
    assert K1.public_key().b64 == P1


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools not installed")
def test_generated_keys_agree_with_wg_pubkey() -> None:
    """A generated key is 44-char base64 and `wg pubkey` agrees with our public key."""
    key = PrivateKey.generate()
    out = subprocess.run(
        ["wg", "pubkey"], input=key.b64 + "\n", capture_output=True, text=True, check=True
    )
    assert len(key.b64) == 44 and out.stdout.strip() == key.public_key().b64


def test_hex_and_base64_round_trip() -> None:
    """UAPI hex and wg base64 are the same 32 bytes."""
    assert hex_to_b64(b64_to_hex(P1)) == P1
    assert PublicKey.from_hex(PublicKey.from_b64(P1).hex).b64 == P1


@pytest.mark.parametrize(
    "bad", ["", "abc", "A" * 42 + "==", "!" * 44, "QUFB", "A" * 43 + "=" + "A"]
)
def test_bad_keys_are_refused(bad: str) -> None:
    """Anything that is not 32 bytes of base64 is a KeyFormatError."""
    with pytest.raises(KeyFormatError):
        PublicKey.from_b64(bad)


def test_private_key_repr_hides_the_secret() -> None:
    """repr() shows the public key, never the private one."""
    assert K1.b64 not in repr(K1) and P1 in repr(K1)


def test_render_set_exact_bytes() -> None:
    """A set with device fields, an add, an update and a removal renders line for line."""
    ops = [
        PeerOp(
            public_key=P1,
            endpoint="10.0.0.2:51820",
            persistent_keepalive=25,
            replace_allowed_ips=True,
            allowed_ips=("10.4.0.2", "fd00::1/128"),
        ),
        PeerOp(public_key=P2, update_only=True, endpoint="[::1]:7"),
        PeerOp(public_key=P2, remove=True, allowed_ips=("1.2.3.4/32",)),
    ]
    got = render_set(ops, private_key=K1, listen_port=51820, replace_peers=True)
    h1, h2 = b64_to_hex(P1), b64_to_hex(P2)
    assert (
        got
        == (
            f"set=1\nprivate_key={K1.hex}\nlisten_port=51820\nreplace_peers=true\n"
            f"public_key={h1}\nendpoint=10.0.0.2:51820\npersistent_keepalive_interval=25\n"
            "replace_allowed_ips=true\nallowed_ip=10.4.0.2/32\nallowed_ip=fd00::1/128\n"
            f"public_key={h2}\nupdate_only=true\nendpoint=[::1]:7\n"
            f"public_key={h2}\nremove=true\n\n"
        ).encode()
    )


GET_ANSWER = (
    f"private_key={K1.hex}\nlisten_port=51820\n"
    f"public_key={b64_to_hex(P2)}\npreshared_key={'0' * 64}\nprotocol_version=1\n"
    "endpoint=[fe80::1]:51821\nlast_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=500000000\ntx_bytes=1234\nrx_bytes=5678\n"
    "persistent_keepalive_interval=25\nallowed_ip=10.4.0.3/32\nallowed_ip=10.5.0.0/16\n"
    f"public_key={b64_to_hex(P1)}\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"
    "tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0\nfuture_key=whatever\n"
    "errno=0\n\n"
).encode()


def test_parse_get_reads_device_and_peer_stats() -> None:
    """Device key/port and each peer's endpoint, handshake, counters and IPs are typed."""
    status = parse_get(GET_ANSWER)
    assert status.public_key == P1 and status.listen_port == 51820
    first, second = status.peers
    assert first.public_key == P2 and first.endpoint == "[fe80::1]:51821"
    assert first.last_handshake == 1700000000.5
    assert (first.rx_bytes, first.tx_bytes, first.persistent_keepalive) == (5678, 1234, 25)
    assert first.allowed_ips == ("10.4.0.3/32", "10.5.0.0/16")
    assert second.public_key == P1 and second.last_handshake is None
    assert second.endpoint is None and second.allowed_ips == ()


def test_errno_becomes_uapi_error() -> None:
    """A non-zero errno on get or set raises UapiError carrying that errno."""
    with pytest.raises(UapiError) as info:
        parse_get(b"errno=13\n\n")
    assert info.value.errno == 13 and "Permission denied" in str(info.value)
    with pytest.raises(UapiError) as info2:
        check_set_response(b"errno=22\n\n")
    assert info2.value.errno == 22
    check_set_response(b"errno=0\n\n")


@pytest.mark.parametrize(
    "answer",
    [
        b"listen_port=1\n\n",
        b"garbage\nerrno=0\n\n",
        b"listen_port=x\nerrno=0\n\n",
        b"public_key=zz\nerrno=0\n\n",
        b"\xff=1\nerrno=0\n\n",
        b"errno=x\n\n",
    ],
)
def test_malformed_get_answers_are_protocol_errors(answer: bytes) -> None:
    """Truncated answers, lines without '=', bad numbers and bad keys: UapiProtocolError."""
    with pytest.raises(UapiProtocolError):
        parse_get(answer)


@given(st.binary(max_size=300))
def test_parse_get_only_raises_wireguard_errors(data: bytes) -> None:
    """Random bytes never escape as anything but a WireGuardError."""
    try:
        parse_get(data)
    except WireGuardError:
        pass


KEYS = [PrivateKey.from_hex(f"{i:064x}").public_key().b64 for i in range(1, 7)]
peers = st.builds(
    PeerConfig,
    public_key=st.sampled_from(KEYS),
    allowed_ips=st.lists(
        st.sampled_from(["10.0.0.1/32", "10.0.0.2/32", "10.1.0.0/16", "fd00::/64"]), max_size=3
    ).map(tuple),
    endpoint=st.sampled_from([None, "10.9.0.1:51820", "10.9.0.2:51820"]),
    persistent_keepalive=st.sampled_from([0, 25]),
)
peer_sets = st.lists(peers, max_size=6, unique_by=lambda p: p.public_key)


def _modulo_roaming(desired: list[PeerConfig], result: tuple[PeerConfig, ...]) -> bool:
    by_key = {p.public_key: p for p in result}
    if set(by_key) != {p.public_key for p in desired}:
        return False
    for want in desired:
        got = by_key[want.public_key]
        if (got.allowed_ips, got.persistent_keepalive) != (
            want.allowed_ips,
            want.persistent_keepalive,
        ):
            return False
        if want.endpoint is not None and got.endpoint != want.endpoint:
            return False
    return True


@given(peer_sets, peer_sets)
def test_diff_then_apply_reaches_desired(
    desired: list[PeerConfig], current: list[PeerConfig]
) -> None:
    """Applying the diff yields the desired peers (an unset endpoint keeps what the peer had)."""
    ops = diff_peers(desired, current)
    assert _modulo_roaming(desired, apply_ops(current, ops))


@given(peer_sets, peer_sets)
def test_diff_never_touches_unchanged_peers(
    desired: list[PeerConfig], current: list[PeerConfig]
) -> None:
    """A peer that is identical on both sides appears in no operation; re-diffing is empty."""
    ops = diff_peers(desired, current)
    same = {p.public_key for p in desired} & {p.public_key for p in current if p in desired}
    assert not same & {op.public_key for op in ops}
    assert diff_peers(desired, apply_ops(current, ops)) == ()


def test_diff_sends_only_changed_fields() -> None:
    """Changing only the keepalive sends update_only with the keepalive and nothing else."""
    old = PeerConfig(P1, ("10.0.0.1/32",), "10.9.0.1:1", 0)
    (op,) = diff_peers([PeerConfig(P1, ("10.0.0.1",), None, 25)], [old])
    assert op == PeerOp(public_key=P1, update_only=True, persistent_keepalive=25)


def test_diff_refuses_contradictory_desired_peers() -> None:
    """The same key desired twice with different settings is an error, not a coin toss."""
    with pytest.raises(KeyFormatError):
        diff_peers([PeerConfig(P1, ("10.0.0.1/32",)), PeerConfig(P1, ("10.0.0.2/32",))], [])


def test_diff_device_reports_only_differences() -> None:
    """Same key and port: nothing; a new port: only the port is set."""
    status = DeviceStatus(public_key=P1, listen_port=51820)
    assert diff_device(DeviceConfig(K1, 51820), status) is None
    change = diff_device(DeviceConfig(K1, 51821), status)
    assert change is not None and change.listen_port == 51821 and change.fwmark is None
