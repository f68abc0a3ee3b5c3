"""`pydstack attest verify`: documented verdicts on the vectors and on simulator evidence."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pydstack.adapters.tdx.pki import DevPki
from pydstack.cli.attest import attest

from .conftest import APP_ID, Guest

V = Path(__file__).parent.parent / "vectors"
OUTDATED_COLL = str(V / "dcap-qvl" / "tdx_quote_outdated_collateral.json")


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(attest, ["verify", *args])
    return result.exit_code, result.output


def test_quote_report_with_event_log_is_trusted() -> None:
    """dstack's quote-report.json verifies and its 28-event log replays: exit 0."""
    code, out = _run(
        str(V / "dstack" / "quote-report.json"),
        "--collateral",
        OUTDATED_COLL,
        "--now",
        "1772000000",
        "--json",
    )
    report = json.loads(out)
    assert code == 0 and report["verdict"] == "trusted" and report["tcb_status"] == "UpToDate"
    assert report["event_log"] == {"events": 28, "replays": True}
    assert report["app"]["os_image_hash"].startswith("14ad42d0")


def test_intel_sample_quote_trusted_then_expired() -> None:
    """The Intel sample quote is trusted inside its collateral window, refused after it."""
    coll = str(V / "dcap-qvl" / "tdx_quote_collateral.json")
    quote = str(V / "dcap-qvl" / "tdx_quote")
    assert _run(quote, "--collateral", coll, "--now", "1751000000")[0] == 0
    code, out = _run(quote, "--collateral", coll, "--now", "1752920200")
    assert code == 1 and "refused" in out


def test_outdated_sample_quote_refused() -> None:
    """The second Intel sample has no matching TCB level: exit 1 with dcap-qvl's reason."""
    code, out = _run(
        str(V / "dcap-qvl" / "tdx_quote_outdated"),
        "--collateral",
        OUTDATED_COLL,
        "--now",
        "1772000000",
    )
    assert code == 1 and "No matching TCB level" in out


def test_event_log_that_does_not_replay_is_refused(tmp_path: Path) -> None:
    """A valid quote with a tampered event log exits 1 naming the RTMR."""
    doc = json.loads((V / "dstack" / "quote-report.json").read_text())
    events = json.loads(doc["event_log"])
    events[0]["digest"] = "00" * 48
    (tmp_path / "q.hex").write_text(doc["quote"])
    (tmp_path / "log.json").write_text(json.dumps(events))
    code, out = _run(
        str(tmp_path / "q.hex"),
        "--event-log",
        str(tmp_path / "log.json"),
        "--collateral",
        OUTDATED_COLL,
        "--now",
        "1772000000",
    )
    assert code == 1 and "rtmr0" in out.lower()


async def test_simulated_ratls_cert_verifies_with_dev_root(guest: Guest, tmp_path: Path) -> None:
    """An RA-TLS cert from the agent is trusted with the dev root, refused without it."""
    out = await guest.agent.tls_key(
        guest.agent.fresh_tls_key(),
        subject="x",
        alt_names=[],
        usage_ra_tls=True,
        usage_server_auth=True,
        usage_client_auth=False,
    )
    (tmp_path / "cert.pem").write_text(out["certificate_chain"][0])
    (tmp_path / "coll.json").write_text(guest.pki.collateral_json(guest.now))
    (tmp_path / "root.der").write_bytes(guest.pki.root_der)
    args = [
        str(tmp_path / "cert.pem"),
        "--collateral",
        str(tmp_path / "coll.json"),
        "--now",
        str(guest.now),
    ]
    code, text = _run(*args, "--dev-root", str(tmp_path / "root.der"), "--json")
    assert code == 0, text
    assert json.loads(text)["app"]["app_id"] == APP_ID.hex()
    assert _run(*args)[0] == 1
    cert = x509.load_pem_x509_certificate(out["certificate_chain"][0].encode())
    assert cert.public_bytes(serialization.Encoding.PEM).decode() == out["certificate_chain"][0]


async def test_dev_pki_root_alone_verifies_without_a_collateral_file(
    guest: Guest, tmp_path: Path
) -> None:
    """`--dev-root DIR/root.der` of a simulator PKI dir (up's DATA/dev-pki) needs no
    --collateral: the PKI signs one as of --now; another PKI's root does not verify it."""
    out = await guest.agent.tls_key(
        guest.agent.fresh_tls_key(), subject="x", alt_names=[], usage_ra_tls=True,
        usage_server_auth=True, usage_client_auth=False,
    )  # fmt: skip
    (tmp_path / "cert.pem").write_text(out["certificate_chain"][0])
    guest.pki.save(tmp_path / "pki")
    cert, now = str(tmp_path / "cert.pem"), str(guest.now)
    code, text = _run(cert, "--dev-root", str(tmp_path / "pki" / "root.der"), "--now", now)
    assert code == 0 and "verdict: trusted" in text, text
    DevPki.generate().save(tmp_path / "other")
    code, text = _run(cert, "--dev-root", str(tmp_path / "other" / "root.der"), "--now", now)
    assert code == 1 and "verdict: refused" in text, text
