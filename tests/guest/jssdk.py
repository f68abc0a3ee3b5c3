"""Drive dstack's JavaScript SDK (`dstack_sdk_js.mjs` under node) against an agent's sockets,
and check every answer with pydstack's own verifiers.

node (Debian ``nodejs``) and the SDK (``.venv/dstack-sdk-js``, pinned in the Makefile) are
installed by ``make deps``; without them these tests fail saying so, they never skip.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from pydstack.adapters.tdx.attestation import decode_attestation
from pydstack.adapters.tdx.eventlog import parse_json_event_log, replay_rtmrs
from pydstack.adapters.tdx.quote import parse_quote
from pydstack_guest.keys import key_public, verify_key_chain

from .tlscheck import TlsOptions, check_tls_key

ROOT = Path(__file__).resolve().parents[2]
SDK_PREFIX = ROOT / ".venv" / "dstack-sdk-js"
DRIVER = Path(__file__).with_name("dstack_sdk_js.mjs")


def node_and_sdk() -> str:
    """The node binary; fails the test (never skips) when `make deps` has not installed it."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing: `make deps` installs Debian's nodejs (with npm)")
    if not (SDK_PREFIX / "node_modules" / "@phala" / "dstack-sdk" / "package.json").exists():
        pytest.fail(f"@phala/dstack-sdk is missing under {SDK_PREFIX}: run `make deps`")
    return node


async def run_js_sdk(dstack: str, tappd: str | None, options: list[TlsOptions]) -> dict[str, Any]:
    """Every SDK call's answer, by name (see dstack_sdk_js.mjs)."""
    node = node_and_sdk()
    cfg = {"dstack": dstack, "tappd": tappd,
           "tls_options": [dataclasses.asdict(o) for o in options]}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        node, str(DRIVER), json.dumps(cfg), env={**os.environ, "DSTACK_SDK_JS": str(SDK_PREFIX)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


Verify = Callable[[bytes, str], list[str]]


def check_js_results(
    r: dict[str, Any], options: list[TlsOptions], *, verify: Verify, app_id: bytes,
    kms_root: bytes, chain_len: int, tappd: bool,
) -> None:  # fmt: skip
    """Each call answered what dstack's agent answers; quotes verify (`verify` gives the
    reasons a quote and its JSON event log fail, [] when they pass)."""
    errors = {k: v for k, v in r.items() if isinstance(v, dict) and "error" in v}
    # The SDK's DstackClient.deriveKey only throws (deprecated), as it does against dstack.
    assert errors == {"deriveKey": {"error": "deriveKey is deprecated, please use getKey instead."}}
    assert r["version"]["version"] and r["isReachable"] is True
    info = r["info"]
    assert (
        info["app_id"] == app_id.hex() and info["app_cert"].count("BEGIN CERTIFICATE") == chain_len
    )
    assert info["tcb_info"]["rtmr3"] and info["tcb_info"]["event_log"]
    q = r["getQuote"]
    quote = bytes.fromhex(q["quote"])
    assert verify(quote, q["event_log"]) == []
    assert parse_quote(quote).report.report_data == b"js-nonce".ljust(64, b"\0")
    assert [bytes.fromhex(x) for x in q["rtmrs"]] == list(parse_quote(quote).report.rtmrs)
    att = decode_attestation(bytes.fromhex(r["attest"]["attestation"]))
    assert att.report_data == b"js-attest".ljust(64, b"\0")
    ev = r["emitEvent"]
    assert verify(bytes.fromhex(ev["quote"]), ev["event_log"]) == []
    last = parse_json_event_log(ev["event_log"])[-1]
    assert (last.imr, last.event, last.event_payload) == (3, "js-event", b"js-payload")
    for name, algo in (("default", "secp256k1"), ("secp256k1", "secp256k1"),
                       ("k256", "secp256k1"), ("ed25519", "ed25519")):  # fmt: skip
        k = r[f"getKey:{name}"]
        pub = key_public(bytes.fromhex(k["key"]), algo)
        chain = [bytes.fromhex(s) for s in k["signature_chain"]]
        assert verify_key_chain(pub, "signing", chain, app_id, kms_root) == []
    d = r["getTlsKey:default"]
    check_tls_key(d["key"], d["certificate_chain"], TlsOptions(), chain_len=chain_len)
    assert len(bytes.fromhex(d["u8"])) == 32
    for i, o in enumerate(options):
        t = r[f"getTlsKey:{i}"]
        check_tls_key(t["key"], t["certificate_chain"], o, chain_len=chain_len)
    for algo in ("secp256k1", "ed25519", "secp256k1_prehashed"):  # and Verify of each
        s = r[f"sign:{algo}"]
        assert s["valid"] is True and s["other_valid"] is False
        sig, pub, data = (bytes.fromhex(s[k]) for k in ("signature", "public_key", "data"))
        if algo == "ed25519":
            ed25519.Ed25519PublicKey.from_public_bytes(pub).verify(sig, data)
        else:
            point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), pub)
            der = encode_dss_signature(int.from_bytes(sig[:32]), int.from_bytes(sig[32:]))
            from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

            prehashed = data if algo == "secp256k1_prehashed" else hashlib.sha256(data).digest()
            point.verify(der, prehashed, ec.ECDSA(Prehashed(hashes.SHA256())))
        chain = [bytes.fromhex(c) for c in s["signature_chain"]]
        assert chain[0] == sig
        assert verify_key_chain(pub, "signing", chain[1:], app_id, kms_root) == []
    raw = r["tdxQuote:raw"]
    assert verify(bytes.fromhex(raw["quote"]), raw["event_log"]) == []
    if not tappd:
        return
    assert r["tappd.isReachable"] is True
    dk = r["tappd.deriveKey"]
    opts = TlsOptions(subject="js.example", alt_names=("js.example", "192.0.2.7"),
                      usage_server_auth=False)  # fmt: skip
    check_tls_key(dk["key"], dk["certificate_chain"], opts, chain_len=chain_len)
    for algo in ("raw", "sha256", "keccak256"):
        tq = r[f"tappd.tdxQuote:{algo}"]
        assert verify(bytes.fromhex(tq["quote"]), tq["event_log"]) == []
        assert tq["hash_algorithm"] == algo
    report = parse_quote(bytes.fromhex(r["tappd.tdxQuote:sha256"]["quote"])).report
    assert report.report_data == hashlib.sha256(b"app-data:js-tappd").digest().ljust(64, b"\0")
    events = parse_json_event_log(r["tappd.tdxQuote:raw"]["event_log"])
    assert (
        replay_rtmrs(events)
        == parse_quote(bytes.fromhex(r["tappd.tdxQuote:raw"]["quote"])).report.rtmrs
    )
    assert r["tappd.info"]["app_id"] == app_id.hex()  # TappdClient.info() asks /Info
