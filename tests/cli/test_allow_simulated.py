"""`up` on simulated attestation serves loopback clients only, unless --allow-simulated
(issue 15.8), and its gateway reports the WireGuard backend it chose (issue 15.7).

The rule (`pydstack.cli.up_listeners`) is tested purely; the refusals through the CLI, each
before anything starts (~1.5 s apiece); the allowed case with one real `up` (embedded NATS,
KMS, gateway, dashboard: ~10 s) listening on an address of a network namespace the test makes,
where `ss` lists every socket it opened, compared with what the rule predicted.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pydstack.cli.up_listeners import (
    Listener,
    is_loopback,
    refusal,
    simulated_reason,
    tsm_report_present,
    up_listeners,
)
from pydstack.controlplane import UpOptions
from tests.cli.harness import Up, cli, kill_processes_under
from tests.netns import Netns, entered

simulated_here = pytest.mark.skipif(
    tsm_report_present(), reason="this host has TDX (configfs-tsm): attestation is not simulated"
)


# -- the rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("127.9.8.7", True), ("::1", True), ("[::1]", True),
     ("::ffff:127.0.0.1", True), ("localhost", True), ("0.0.0.0", False), ("::", False),
     ("", False), ("10.1.2.3", False), ("::ffff:0.0.0.0", False), ("fe80::1", False),
     ("localhost.example", False), ("127.0.0.1.nip.io", False), ("0", False)],
)  # fmt: skip
def test_only_loopback_addresses_count_as_loopback(address: str, loopback: bool) -> None:
    """Names other than `localhost` may resolve anywhere; wildcards reach every address."""
    assert is_loopback(address) is loopback


def test_default_up_listens_on_loopback_only() -> None:
    """NATS, KMS, gateway and dashboard all on 127.0.0.1: nothing to refuse."""
    got = up_listeners(UpOptions(), nats_host="127.0.0.1", embedded=True)
    assert [x.serves for x in got] == [
        "NATS client port", "KMS", "gateway HTTPS and RegisterCvm", "dashboard"]  # fmt: skip
    assert all(is_loopback(x.address) for x in got)


def test_each_listener_is_named_with_the_option_that_sets_its_address() -> None:
    """--listen 0.0.0.0 exposes NATS and the gateway (the KMS binds 127.0.0.1 then, as
    controlplane does), a given --gateway-listen / --dashboard-listen their own; the VMM API
    and public CVM ports count when a VMM runs."""
    o = UpOptions(host="0.0.0.0", dashboard_listen="10.0.0.5", vmm_backend="sandbox",
                  host_id="h1", vmm_api_port=0, allow_public_ports=True)  # fmt: skip
    got = up_listeners(o, nats_host="0.0.0.0", embedded=True)
    assert got == [
        Listener("--listen", "NATS client port", "0.0.0.0"),
        Listener("--listen", "KMS", "127.0.0.1"),
        Listener("--listen", "gateway HTTPS and RegisterCvm", "0.0.0.0"),
        Listener("--dashboard-listen", "dashboard", "10.0.0.5"),
        Listener("--listen", "VMM API (--vmm-api-port)", "0.0.0.0"),
        Listener("--allow-public-ports", "CVM port forwards", "0.0.0.0"),
    ]
    gw = up_listeners(UpOptions(gateway_listen="10.0.0.6"), nats_host="127.0.0.1", embedded=True)
    assert Listener("--gateway-listen", "gateway HTTPS and RegisterCvm", "10.0.0.6") in gw


def test_a_joined_nats_and_services_not_run_are_not_listeners() -> None:
    """--join: no embedded nats-server, so no KMS or gateway by default either."""
    o = UpOptions(nats_url="nats://10.0.0.1:4222", dashboard_port=-1)
    assert up_listeners(o, nats_host="10.0.0.9", embedded=False) == []
    off = UpOptions(host="10.0.0.9", kms=False, gateway=False, dashboard_port=-1)
    assert up_listeners(off, nats_host="10.0.0.9", embedded=True) == [
        Listener("--listen", "NATS client port", "10.0.0.9")]  # fmt: skip


def test_simulated_reason_names_what_simulates() -> None:
    assert simulated_reason(tsm_report=False, vmm_backend="", vmm_platform="auto").startswith(
        "no TDX on this host: /sys/kernel/config/tsm/report is missing")  # fmt: skip
    assert simulated_reason(tsm_report=True, vmm_backend="sandbox", vmm_platform="auto")
    assert simulated_reason(tsm_report=True, vmm_backend="qemu", vmm_platform="tcg")
    assert simulated_reason(tsm_report=True, vmm_backend="qemu", vmm_platform="tdx") == ""


def test_the_refusal_is_one_line_naming_each_option_and_the_way_out() -> None:
    exposed = [Listener("--listen", "NATS client port", "0.0.0.0"),
               Listener("--listen", "gateway HTTPS and RegisterCvm", "0.0.0.0"),
               Listener("--dashboard-listen", "dashboard", "")]  # fmt: skip
    line = refusal(exposed, "no TDX")
    assert "\n" not in line
    assert "--listen 0.0.0.0 (NATS client port, gateway HTTPS and RegisterCvm)" in line
    assert "--dashboard-listen 0.0.0.0 (dashboard)" in line and "--allow-simulated" in line


# -- refused through the CLI, before anything starts -------------------------------------------


@simulated_here
@pytest.mark.parametrize(
    "args",
    [("--listen", "0.0.0.0"), ("--listen", "::"), ("--gateway-listen", "0.0.0.0"),
     ("--dashboard-listen", "0.0.0.0"), ("--dashboard-listen", ""),
     ("--no-kms", "--vmm", "sandbox", "--allow-public-ports", "--platform", "auto")],
    ids=["listen", "listen-v6", "gateway-listen", "dashboard-listen", "dashboard-empty",
         "public-ports"],
)  # fmt: skip
def test_non_loopback_listeners_are_refused_before_anything_starts(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """One line naming the option and --allow-simulated, exit 1, and the data dir untouched:
    no config.json, no identities, no nats-server, so nothing appended."""
    home = tmp_path / "home"
    r = cli(home, "up", "--metrics-port", "-1", *args, timeout=30)
    assert r.code == 1, r.out + r.err
    [line] = r.err.strip().splitlines()
    assert line.startswith("Error: attestation is SIMULATED (no TDX on this host"), line
    assert f"not loopback: {args[-2] if args[0] != '--no-kms' else '--allow-public-ports'}" in line
    assert "--allow-simulated" in line
    assert not home.exists() or list(home.iterdir()) == []


@simulated_here
def test_a_remembered_wildcard_listen_address_is_refused_too(tmp_path: Path) -> None:
    """config.json keeps --listen from an earlier `up --listen 0.0.0.0 --allow-simulated`:
    a later plain `up` would bind it again, so it is refused the same way (not rewritten)."""
    home = tmp_path / "home"
    home.mkdir()
    config = json.dumps({"host": "0.0.0.0", "port": 4222, "stream": "DSTACK"}) + "\n"
    (home / "config.json").write_text(config)
    r = cli(home, "up", "--metrics-port", "-1", timeout=30)
    assert r.code == 1 and "--listen 0.0.0.0 (NATS client port" in r.err, r.err
    assert sorted(p.name for p in home.iterdir()) == ["config.json"]
    assert (home / "config.json").read_text() == config


# -- allowed: one real `up` on a namespace's address -------------------------------------------


@pytest.fixture
def lan_ns() -> Iterator[tuple[Netns, str]]:
    """A namespace with a non-loopback address for `up` to listen on (on its lo: no link
    leaves the namespace, and this kernel has no dummy links)."""
    address = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}.1"
    with Netns.create("allowsim") as ns:
        ns.ip("addr", "add", f"{address}/24", "dev", "lo")
        yield ns, address


def _listening(ns: Netns) -> set[tuple[str, int]]:
    """Every TCP socket listening in ``ns`` (address, port)."""
    out = subprocess.run(ns.argv("ss", "-Hltn"), capture_output=True, text=True, check=True)
    got = set()
    for row in out.stdout.splitlines():
        local = row.split()[3]
        host, _, port = local.rpartition(":")
        got.add((host.strip("[]").split("%")[0], int(port)))
    return got


def _port(url: str) -> int:
    port = urlsplit(url if "://" in url else f"x://{url}").port
    assert port is not None, url
    return port


@simulated_here
def test_allowed_simulated_up_serves_its_address_says_so_and_reports_its_wireguard(
    short_tmp: Path, lan_ns: tuple[Netns, str]
) -> None:
    """With --allow-simulated, `up --listen ADDR` serves NATS, KMS, gateway and dashboard on
    ADDR and warns loudly; the sockets it opens beyond loopback are exactly those the rule
    named; `gateway status` shows the WireGuard backend the node chose and why (also in its
    GatewayNodeJoined)."""
    ns, address = lan_ns
    home = short_tmp / "home"  # wireguard-go's UAPI socket lives under it: short path
    up = Up(home, extra=("--listen", address, "--dashboard-listen", address, "--gateway",
                         "--allow-simulated"))  # fmt: skip
    with entered(ns):  # up, its children and every CLI call of the test live in ns
        try:
            up.start()
            warned = [e for e in up.events() if e.get("event", "").startswith("--allow-simulated")]
            assert len(warned) == 1 and warned[0]["level"] == "warning", warned
            assert "SIMULATED ATTESTATION SERVED BEYOND LOOPBACK" in warned[0]["event"]
            assert sorted(warned[0]["listeners"]) == sorted([
                f"NATS client port on {address} (--listen)", f"KMS on {address} (--listen)",
                f"gateway HTTPS and RegisterCvm on {address} (--listen)",
                f"dashboard on {address} (--dashboard-listen)"])  # fmt: skip
            state = json.loads((home / "state.json").read_text())
            served = {
                _port(state[k])
                for k in (
                    "nats_url",
                    "kms_url",
                    "gateway_proxy",
                    "gateway_registration_url",
                    "dashboard_url",
                )
            }
            exposed = {(h, p) for h, p in _listening(ns) if not is_loopback(h)}
            assert exposed == {(address, p) for p in served}, (exposed, state)

            doc = json.loads(cli(home, "gateway", "status", "--json").out)
            [node] = doc["nodes"]
            [live] = doc["live"]
            kernel = _kernel_has_wireguard(ns)
            want = "kernel" if kernel else "userspace"
            assert node["wg_backend"] == live["wg_backend"] == want, doc
            assert node["wg_backend_reason"] == live["wg_backend_reason"]
            if not kernel:
                assert live["wg_backend_reason"].startswith("auto: no wireguard kernel module")
            text = cli(home, "gateway", "status").out
            assert f"wireguard {want}" in text and f"wireguard {want}: auto: " in text, text
            joined = [e for e in cli(home, "events", "--json").lines()
                      if e["type"] == "GatewayNodeJoined"]  # fmt: skip
            assert [e["body"]["wg_backend"] for e in joined] == [want], joined
        finally:
            if up.proc is not None:
                assert up.stop() == 0
            kill_processes_under(short_tmp)


def _kernel_has_wireguard(ns: Netns) -> bool:
    """The test's own oracle: iproute2 making a wireguard link in the namespace."""
    add = ns.argv("ip", "link", "add", "wgoracle", "type", "wireguard")
    if subprocess.run(add, capture_output=True).returncode != 0:
        return False
    subprocess.run(ns.argv("ip", "link", "del", "wgoracle"), check=True)
    return True
