"""``python -m pydstack.actors.gateway``'s options for a RegisterCvm certificate from the KMS
(``--kms-url``, ``--gateway-app-id``, ``--guest-agent``): what cannot work, or would let
dstack's guests trust more than one app, is refused in one line before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pydstack.actors.gateway.__main__ import main
from pydstack.actors.gateway.app_cert import KmsAppCert

GW = "0a" * 20


def run(tmp_path: Path, *extra: str) -> str:
    ca = tmp_path / "kms-root.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    base = ["--nats", "nats://127.0.0.1:1", "--node-id", "gw1", "--base-domain", "gw.test",
            "--endpoint", "127.0.0.1:51820", "--state-dir", str(tmp_path / "state"),
            "--registration-port", "8011", "--client-ca", str(ca)]  # fmt: skip
    result = CliRunner().invoke(main, [*base, *extra])
    assert result.exit_code != 0
    return result.output.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--kms-url", "https://kms:8000", "--guest-agent", "/run/dstack.sock"],
         "--kms-url needs --gateway-app-id"),
        (["--kms-url", "https://kms:8000", "--gateway-app-id", GW], "--kms-url needs"),
        (["--gateway-app-id", GW], "need --kms-url"),
        (["--kms-url", "https://kms:8000", "--gateway-app-id", "any", "--guest-agent", "/s"],
         "is not one app id"),
        (["--kms-url", "https://kms:8000", "--gateway-app-id", GW + "bb" * 20,
          "--guest-agent", "/s"], "is not one app id"),
        ([], "--registration-port needs --client-ca and --tls-chain"),
    ],
    ids=["no-app-id", "no-evidence", "no-kms", "any", "two-ids", "no-certificate"],
)  # fmt: skip
def test_unusable_kms_certificate_options_are_refused(
    tmp_path: Path, extra: list[str], said: str
) -> None:
    assert said in run(tmp_path, *extra)


def test_a_static_certificate_and_the_kms_exclude_each_other(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    out = run(tmp_path, "--kms-url", "https://kms:8000", "--gateway-app-id", GW,
              "--guest-agent", "/s", "--tls-chain", str(pem), "--tls-key", str(pem))  # fmt: skip
    assert "exclude each other" in out


def test_the_certificate_names_the_advertised_url_and_the_listen_address(tmp_path: Path) -> None:
    """As dstack's gateway asks (its `rpc_domain` and `my_url`'s host): the names a guest's
    TLS hostname check sees; a wildcard listen address is no name."""
    from pydstack.actors.gateway.__main__ import _kms_cert

    def spec(host: str) -> KmsAppCert:
        out = _kms_cert({
            "kms_url": "https://kms:8000", "gateway_app_id": "0x" + GW.upper(),
            "guest_agent": "/s", "tls": (None, None, "ROOT"),
            "url": "https://gw.example.com:8011", "registration_host": host,
        })  # fmt: skip
        assert isinstance(out, KmsAppCert)
        return out

    one = spec("0.0.0.0")
    assert one == KmsAppCert(kms_url="https://kms:8000", kms_root_pem="ROOT",
                             app_id=bytes.fromhex(GW), alt_names=("gw.example.com",),
                             guest_agent="/s")  # fmt: skip
    assert spec("10.0.0.5").alt_names == ("gw.example.com", "10.0.0.5")
