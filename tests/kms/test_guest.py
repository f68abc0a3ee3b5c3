"""The guest side: a simulated CVM's agent gets its keys from the KMS; env vars both ways."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from dstack_sdk import AsyncDstackClient
from dstack_sdk.encrypt_env_vars import EnvVar, encrypt_env_vars

from pydstack.adapters.tdx.collateral import Collateral
from pydstack.adapters.tdx.eventlog import parse_json_event_log
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.verify import Policy, verify_quote
from pydstack.cli.env import env as env_cli
from pydstack.core.events import KeyIssued
from pydstack.core.kms import app_key_material
from pydstack_guest import GuestAgent, GuestConfig, serve_agent
from pydstack_guest.keys import key_public, verify_key_chain
from pydstack_guest.kms_provider import KmsKeyProvider, decrypt_env
from pydstack_guest.kms_trust import KmsCheckFailed, KmsTrust
from tests.guest.jssdk import check_js_results, run_js_sdk
from tests.guest.pysdk import run_py_sdk
from tests.guest.tlscheck import TlsOptions, check_tls_key, option_matrix

from .conftest import APP_ID, CLUSTER, VM_CONFIG, Cvm, Kms, make_cvm


def trust(kms: Kms, pki: DevPki) -> KmsTrust:
    async def source(quote: bytes) -> Collateral:
        return kms.collateral.get(quote)

    return KmsTrust(source, root_ca_der=pki.root_der)


def provider(kms: Kms, pki: DevPki, cvm: Cvm) -> KmsKeyProvider:
    return KmsKeyProvider(
        kms.url, cvm.backend, trust=trust(kms, pki), app_id=APP_ID, vm_config=VM_CONFIG
    )


async def test_guest_agent_boots_on_kms_keys(kms: Kms, pki: DevPki) -> None:
    """The agent's GetKey chain (via dstack-sdk) ends at the KMS root; KeyIssued is logged."""
    cvm = make_cvm(pki)
    agent = await GuestAgent.create(
        cvm.backend, provider(kms, pki, cvm), GuestConfig(vm_config=VM_CONFIG)
    )
    assert agent.keys.kms_root_public == kms.svc.root.k256_public()
    d = Path(tempfile.mkdtemp(prefix="pyds-", dir="/tmp"))
    try:
        async with serve_agent(agent, dstack_sock=str(d / "d.sock"), tappd_sock=str(d / "t.sock")):
            async with AsyncDstackClient(str(d / "d.sock")) as c:
                r = await c.get_key("wallet/eth", "signing")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    pub = key_public(r.decode_key(), "secp256k1")
    chain = r.decode_signature_chain()
    assert verify_key_chain(pub, "signing", chain, APP_ID, kms.svc.root.k256_public()) == []
    issued = [e for e in await kms.events() if isinstance(e, KeyIssued)]
    assert issued[-1].boot_info.app_id == APP_ID.hex()


async def test_guest_refuses_a_kms_without_attestation(kms: Kms, pki: DevPki) -> None:
    """A KMS whose RPC cert carries no acceptable evidence gets no request from the guest;
    the error names the check (more in tests/adversarial/test_cvm_trusts_only_its_kms.py)."""
    kms.collateral.status = "OutOfDate"  # the KMS's own quote now fails the guest's policy
    cvm = make_cvm(pki)
    with pytest.raises(KmsCheckFailed, match="check ra-tls failed") as e:
        await provider(kms, pki, cvm).app_keys()
    assert e.value.check == "ra-tls"
    assert not [e for e in await kms.events() if isinstance(e, KeyIssued)]


async def test_env_vars_encrypted_by_sdk_and_by_cli_decrypt_in_the_guest(
    kms: Kms, pki: DevPki, tmp_path: Path
) -> None:
    """dstack-sdk's encrypt_env_vars and `pydstack env encrypt` both reach the guest's key."""
    cvm = make_cvm(pki)
    keys = await provider(kms, pki, cvm).app_keys()
    async with kms.client() as c:
        pub = await c.call("GetAppEnvEncryptPubKey", {"app_id": APP_ID.hex()})
    blob = bytes.fromhex(
        await encrypt_env_vars([EnvVar("DB_PASS", "s3cr3t"), EnvVar("X", "=1")], pub["public_key"])
    )
    assert decrypt_env(keys.env_crypt_key, blob) == [("DB_PASS", "s3cr3t"), ("X", "=1")]

    (tmp_path / ".env").write_text('# comment\nDB_PASS="s3cr3t"\nexport TOKEN=abc\n')
    root = kms.svc.root.k256_public().hex()
    pki.save(tmp_path / "pki")  # no CA pinned: the KMS's RA-TLS is checked under the dev PKI
    args = ["encrypt", "--app-id", APP_ID.hex(), "--kms", kms.url, "--kms-dev-pki",
            str(tmp_path / "pki"), "--kms-root", root]  # fmt: skip
    result = await asyncio.to_thread(CliRunner().invoke, env_cli, [*args, str(tmp_path / ".env")])
    assert result.exit_code == 0, result.output
    assert "SIMULATED TDX" in result.output
    blob = bytes.fromhex(result.stdout.strip().splitlines()[-1])
    assert decrypt_env(keys.env_crypt_key, blob) == [("DB_PASS", "s3cr3t"), ("TOKEN", "abc")]
    # A wrong pinned root is refused before anything is encrypted.
    bad = [*args[:-1], "02" + "11" * 32, str(tmp_path / ".env")]
    result = await asyncio.to_thread(CliRunner().invoke, env_cli, bad)
    assert result.exit_code != 0 and "not the pinned KMS root" in result.output


async def test_env_encrypt_trusts_the_kms_roots_on_the_log_without_a_pinned_root(
    kms: Kms, pki: DevPki, tmp_path: Path
) -> None:
    """Without --kms-root the env key must recover the root of the cluster (--kms-cluster) on
    the log, over TLS to its CA from the log; only when no log is reachable does it fall back
    to GetMeta's root, saying so, from a KMS whose RA-TLS verified under the dev PKI."""
    (tmp_path / ".env").write_text("A=1\n")
    pki.save(tmp_path / "home" / "dev-pki")  # what a simulated `up` leaves in its data dir
    base = ["encrypt", "--app-id", APP_ID.hex(), "--kms", kms.url, "--kms-cluster", CLUSTER,
            "--data-dir", str(tmp_path / "home")]  # fmt: skip
    env_key = app_key_material(kms.svc.root, APP_ID, b"\x11" * 20).env_crypt_key

    def run(*extra: str) -> Result:
        return CliRunner().invoke(env_cli, [*base, *extra, str(tmp_path / ".env")])

    on_log = await asyncio.to_thread(run, "--nats", kms.store.url)
    assert on_log.exit_code == 0, on_log.output
    assert "warning" not in on_log.output
    assert decrypt_env(env_key, bytes.fromhex(on_log.output.strip().splitlines()[-1])) == [
        ("A", "1")
    ]
    no_log = await asyncio.to_thread(run, "--nats", "nats://127.0.0.1:1")
    assert no_log.exit_code == 0, no_log.output
    assert "no KMS root on a reachable log; trusting the root the KMS reports" in no_log.output
    assert "SIMULATED TDX" in no_log.output


async def test_get_tls_key_through_kms_signcert_defaults_and_options(kms: Kms, pki: DevPki) -> None:
    """On KMS keys GetTlsKey goes through SignCert: the SDK's default arguments (empty subject)
    and every option combination answer a chain leaf, app CA, KMS root; Info's app_cert is
    such a chain for dstack's demo certificate."""
    cvm = make_cvm(pki)
    agent = await GuestAgent.create(
        cvm.backend, provider(kms, pki, cvm), GuestConfig(vm_config=VM_CONFIG)
    )
    d = Path(tempfile.mkdtemp(prefix="pyds-", dir="/tmp"))
    try:
        async with (
            serve_agent(agent, dstack_sock=str(d / "d.sock")),
            AsyncDstackClient(str(d / "d.sock"), timeout=30) as c,
        ):
            r = await c.get_tls_key()
            check_tls_key(r.key, r.certificate_chain, TlsOptions(), chain_len=3)
            for o in option_matrix(int(time.time())):
                r = await c.get_tls_key(
                    subject=o.subject, alt_names=list(o.alt_names), usage_ra_tls=o.usage_ra_tls,
                    usage_server_auth=o.usage_server_auth,
                    usage_client_auth=o.usage_client_auth, with_app_info=o.with_app_info,
                    not_before=o.not_before, not_after=o.not_after,
                )  # fmt: skip
                check_tls_key(r.key, r.certificate_chain, o, chain_len=3)
                assert r.certificate_chain[2] == kms.svc.created.ca_cert_pem
            app_cert = (await c.info()).app_cert
            # Both SDKs' whole sweep on the KMS path too (the JavaScript one under node).
            now = int(time.time())
            options = option_matrix(now)
            for run in (run_py_sdk, run_js_sdk):
                out = await run(str(d / "d.sock"), None, options)
                check_js_results(out, options, verify=lambda q, log: verify(kms, pki, q, log),
                                 app_id=APP_ID, kms_root=kms.svc.root.k256_public(), chain_len=3,
                                 tappd=False)  # fmt: skip
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert app_cert.count("BEGIN CERTIFICATE") == 3 and kms.svc.created.ca_cert_pem in app_cert


def verify(kms: Kms, pki: DevPki, quote: bytes, log: str) -> list[str]:
    """Why a CVM's quote and its JSON event log fail under the dev PKI ([] when they pass)."""
    v = verify_quote(quote, kms.collateral.get(quote), Policy(), int(time.time()), pki.root_der,
                     event_log=parse_json_event_log(log))  # fmt: skip
    return list(v.reasons)
