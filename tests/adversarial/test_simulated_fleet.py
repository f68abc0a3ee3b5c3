"""Attack: a fleet runs simulated attestation by accident and serves real users.

A host without TDX signs every quote with the dev PKI, so its KMS, gateway and CVMs prove
nothing. Started the way a fleet host is (listening on its LAN address, a wildcard, a name, a
data dir that remembers one, joining a cluster), `up` must refuse before it binds, writes or
appends anything, in one line naming the option and `--allow-simulated` (issue 15.8). Each
refusal costs one `pydstack up` process that exits at once (~1.5 s); the addresses belong to a
network namespace the test makes.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pydstack.cli.up_listeners import is_loopback, tsm_report_present
from tests.cli.harness import Result, cli
from tests.netns import Netns, entered

pytestmark = pytest.mark.skipif(
    tsm_report_present(), reason="this host has TDX (configfs-tsm): attestation is not simulated"
)


@pytest.fixture
def lan() -> Iterator[tuple[Netns, str]]:
    """A namespace with a LAN-like address (on its lo: no link leaves the namespace)."""
    address = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}.7"
    with Netns.create("fleet") as ns:
        ns.ip("addr", "add", f"{address}/24", "dev", "lo")
        yield ns, address


def _up(home: Path, *args: str) -> Result:
    return cli(home, "up", "--metrics-port", "-1", *args, timeout=30)


def _listeners(ns: Netns) -> list[str]:
    out = subprocess.run(ns.argv("ss", "-Hltun"), capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def _refused(r: Result, home: Path, option: str) -> None:
    assert r.code == 1, r.out + r.err
    [line] = r.err.strip().splitlines()
    assert line.startswith("Error: attestation is SIMULATED") and f"not loopback: {option}" in line
    assert "--allow-simulated" in line
    assert not home.exists() or sorted(p.name for p in home.iterdir()) in ([], ["config.json"])
    assert not (home / "nats").exists()  # no nats-server ever ran: nothing appended


@pytest.mark.parametrize("how", ["lan", "wildcard", "v6-wildcard", "name"])
def test_a_fleet_host_listening_beyond_loopback_is_refused(
    lan: tuple[Netns, str], tmp_path: Path, how: str
) -> None:
    """Each kind of "not only this machine" for --listen is refused before binding (other
    spellings: the property tests below): nothing listens in the namespace afterwards and the
    data dir holds nothing."""
    ns, address = lan
    value = {"lan": address, "wildcard": "0.0.0.0", "v6-wildcard": "::",
             "name": "fleet-host.example"}[how]  # fmt: skip
    home = tmp_path / "home"
    with entered(ns):
        r = _up(home, "--listen", value)
        _refused(r, home, "--listen")
        assert _listeners(ns) == []


def test_a_fleet_host_joining_a_cluster_with_its_kms_and_gateway_on_the_lan_is_refused(
    lan: tuple[Netns, str], tmp_path: Path
) -> None:
    """Joining NATS elsewhere (no local nats-server), the KMS and gateway would still serve
    the LAN: refused before any connection to the cluster is tried."""
    ns, address = lan
    home = tmp_path / "home"
    with entered(ns):
        r = _up(home, "--join", f"nats://{address}:4222", "--listen", address, "--kms",
                "--gateway", "--gateway-listen", "0.0.0.0")  # fmt: skip
        _refused(r, home, "--listen")
        assert f"--listen {address} (KMS)" in r.err
        assert "--gateway-listen 0.0.0.0 (gateway HTTPS and RegisterCvm)" in r.err


def test_a_data_dir_that_remembers_a_lan_address_is_refused(
    lan: tuple[Netns, str], tmp_path: Path
) -> None:
    """A plain `up` on a data dir whose config.json says host=<LAN address> (left by a dev
    run with --allow-simulated) would serve the LAN again: refused, config.json unchanged."""
    ns, address = lan
    home = tmp_path / "home"
    home.mkdir()
    config = json.dumps({"host": address, "port": 4222, "stream": "DSTACK"}) + "\n"
    (home / "config.json").write_text(config)
    with entered(ns):
        r = _up(home)
        _refused(r, home, "--listen")
    assert (home / "config.json").read_text() == config


def test_the_dashboard_on_every_address_is_refused(lan: tuple[Netns, str], tmp_path: Path) -> None:
    ns, _ = lan
    home = tmp_path / "home"
    with entered(ns):
        _refused(_up(home, "--dashboard-listen", "0.0.0.0"), home, "--dashboard-listen")


@given(st.ip_addresses())
def test_only_loopback_ips_pass_as_loopback(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    """Any IP literal passes exactly when only this machine can reach it (IPv4-mapped too)."""
    mapped = getattr(ip, "ipv4_mapped", None)
    want = (mapped or ip).is_loopback
    assert is_loopback(str(ip)) is want
    if ip.version == 6:
        assert is_loopback(f"[{ip}]") is want


@given(st.text(max_size=40))
def test_no_other_text_passes_as_loopback(text: str) -> None:
    """Names may resolve anywhere: only `localhost` and loopback literals pass."""
    if is_loopback(text):
        inner = text.strip("[]")
        assert (
            inner == "localhost"
            or ipaddress.ip_address(inner).is_loopback
            or (ipaddress.IPv6Address(inner).ipv4_mapped is not None)
        )
