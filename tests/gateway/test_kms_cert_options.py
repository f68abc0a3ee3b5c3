"""``python -m pydstack.actors.gateway``'s options for a RegisterCvm certificate from the KMS
(``--kms-url``, ``--gateway-app-id``, ``--guest-agent``): what cannot work, or would let
dstack's guests trust more than one app, is refused in one line before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pydstack.actors.gateway.__main__ import main

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
