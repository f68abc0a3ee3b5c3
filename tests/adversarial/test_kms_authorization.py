"""The cluster's root keys go only to an authorized KMS, and clients trust only their cluster's
KMS (issue 14): real KMS instances on a real NATS, simulated TDX (tests/kms's rig).

Before: the dev backend (a default `make up`) approved `GetKmsKey` for any attested app, which
then held the root and could derive every app's keys; a replica onboarded with no authorization
at all; a KMS served without asking its own backend about itself; `env encrypt` and the
dashboard accepted an env key signed by any cluster's root on the log; a KMS client with no
pinned CA talked to any TLS server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from pydstack.actors.dashboard import EnvKeyError, KmsEnvKey, LiveState
from pydstack.actors.kms import (
    DevBackend,
    KeyProviderSealKey,
    KmsCallError,
    KmsClient,
    KmsService,
    KmsSettings,
    RootKeyFile,
    serve_kms,
)
from pydstack.actors.kms.launch import KmsLaunch, running_kms
from pydstack.adapters.nats import EventStore, NatsServer
from pydstack.adapters.secretfile import write_secret
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.tdx.ratls import build_ratls_cert, ratls_report_data
from pydstack.adapters.tdx.ratls_tls import RaTlsPeerRefused
from pydstack.cli.env import env as env_cli
from pydstack.core.events import (
    KeyDenied,
    KmsReplicaOnboarded,
    KmsRootCreated,
    decode_body,
    open_envelope,
    subject,
)
from pydstack_guest import LocalKeyProvider, create_dev_app_keys
from tests import images
from tests.kms import conftest as rig
from tests.kms.conftest import VM_CONFIG, Webhook, bound_identity, make_cvm

# The KMS rig's fixtures, used here by name.
pki, webhook = rig.pki, rig.webhook

APP_ID = hashlib.sha256(b"any app").digest()[:20]
KMS_MRTD = hashlib.sha384(b"kms image").digest()  # what every simulated KMS TD measures


def dev_launch(tmp: Path, pki_dir: Path, name: str, **kw: Any) -> KmsLaunch:
    """A KMS as `pydstack up` starts one on a machine without TDX (cluster main, dev backend,
    its onboarding token in its data dir)."""
    appkeys = tmp / f"{name}-appkeys.json"
    if not appkeys.exists():
        write_secret(appkeys, create_dev_app_keys(name.encode().ljust(20, b"\0"), now=0)[1])
    opts: dict[str, Any] = dict(
        key_file=str(tmp / f"{name}.sealed"), seal_appkeys=str(appkeys), auth="dev",
        allow_dev_auth=True, dev_pki=str(pki_dir), instance_id=name,
        replica_token_file=str(tmp / f"{name}-onboard-token"),
    )  # fmt: skip
    return KmsLaunch(**(opts | kw))


async def kms_events(store: EventStore, cluster: str = "main") -> list[Any]:
    records, _ = await store.read_aggregate(subject("kms", cluster))
    return [decode_body(open_envelope(r.data)) for r in records]


async def stream_bytes(store: EventStore) -> bytes:
    return b"".join([r.data async for r in store.read(subject="dstack.kms.>")])


@pytest.fixture
def pki_dir(pki: DevPki, tmp_path: Path) -> Path:
    pki.save(tmp_path / "pki")
    return tmp_path / "pki"


async def test_an_app_cannot_fetch_the_root_keys_from_a_dev_kms(
    store: EventStore, pki: DevPki, pki_dir: Path, tmp_path: Path
) -> None:
    """On a dev KMS (a default `make up`), an attested app gets its own keys but `GetKmsKey`
    is refused: the answer holds no root key, the log a KeyDenied saying why, no onboarding.
    The KMS said "dev" loudly when it became ready."""
    await images.register_test_image(store)
    with capture_logs() as logs:
        async with running_kms(store, dev_launch(tmp_path, pki_dir, "kms-a")) as url:
            async with KmsClient(url, dev_pki=pki) as c:
                temp = await c.call("GetTempCaCert")
            identity = await bound_identity(make_cvm(pki), temp)
            async with KmsClient(url, ca_pem=temp["ca_cert"], identity=identity) as c:
                assert (await c.call("GetAppKey", {"vm_config": VM_CONFIG}))["k256_key"]
                status, answer = await c.raw(
                    "GetKmsKey", json.dumps({"vm_config": VM_CONFIG}).encode()
                )
    assert status == 403, answer
    assert "authorizes apps only" in answer["error"]
    seal = KeyProviderSealKey(LocalKeyProvider(tmp_path / "kms-a-appkeys.json"))
    root = RootKeyFile(tmp_path / "kms-a.sealed", "main", seal)
    keys = await root.load()
    ca_key_pem = keys.ca_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()  # fmt: skip
    text = json.dumps(answer)
    assert keys.k256.hex() not in text and ca_key_pem not in text and "keys" not in answer
    events = await kms_events(store)
    [denied] = [e for e in events if isinstance(e, KeyDenied)]
    assert denied.reason.startswith("backend dev denied: the dev backend authorizes apps only")
    assert not [e for e in events if isinstance(e, KmsReplicaOnboarded)]
    ready = [e for e in logs if e["event"].startswith("kms ready")]
    assert ready and ready[0]["auth"] == "dev" and "DEV AUTHORIZATION" in ready[0]["event"]


async def test_onboarding_a_replica_needs_the_sources_token_or_an_allowed_measurement(
    store: EventStore, pki: DevPki, pki_dir: Path, tmp_path: Path
) -> None:
    """A second KMS started as `up --kms --kms-onboard URL` gets nothing from a dev source
    without its onboarding token, or with a wrong one; with the token (as the operator copies
    the source's DATA/kms/onboard-token) it is onboarded, the log saying "token" and never
    holding the token; a source that allow-lists the replica's MRTD needs no token."""
    async with running_kms(store, dev_launch(tmp_path, pki_dir, "kms-a")) as url_a:
        token = tmp_path / "kms-a-onboard-token"
        assert token.stat().st_mode & 0o777 == 0o600
        with pytest.raises(KmsCallError, match="authorizes apps only"):
            async with running_kms(store, dev_launch(tmp_path, pki_dir, "kms-b",
                                                     onboard_from=url_a)):  # fmt: skip
                pass
        wrong = write_secret(tmp_path / "wrong-token", "not-the-token\n")
        with pytest.raises(KmsCallError, match="onboarding token presented is not this KMS's"):
            async with running_kms(store, dev_launch(tmp_path, pki_dir, "kms-b",
                                                     onboard_from=url_a,
                                                     onboard_token_file=str(wrong))):  # fmt: skip
                pass
        assert not (tmp_path / "kms-b.sealed").exists()
        assert not [e for e in await kms_events(store) if isinstance(e, KmsReplicaOnboarded)]
        b = dev_launch(
            tmp_path, pki_dir, "kms-b", onboard_from=url_a, onboard_token_file=str(token)
        )
        async with running_kms(store, b) as url_b:
            async with KmsClient(url_b, dev_pki=pki) as c:
                assert (await c.call("GetMeta"))["k256_pubkey"]
    [onboarded] = [e for e in await kms_events(store) if isinstance(e, KmsReplicaOnboarded)]
    assert onboarded.authorization == "token"
    assert token.read_text().strip().encode() not in await stream_bytes(store)
    denied = [e.reason for e in await kms_events(store) if isinstance(e, KeyDenied)]
    assert len(denied) == 2  # both refusals are decisions on the log
    # The source allow-lists the KMS image's MRTD instead: no token needed.
    allow = dev_launch(tmp_path, pki_dir, "kms-a", allow_mrs=(KMS_MRTD.hex(),))
    async with running_kms(store, allow) as url_a:
        async with running_kms(store, dev_launch(tmp_path, pki_dir, "kms-c",
                                                 onboard_from=url_a)):  # fmt: skip
            pass
    last = [e for e in await kms_events(store) if isinstance(e, KmsReplicaOnboarded)][-1]
    assert last.authorization == f"mr_td:{KMS_MRTD.hex()}"


@pytest.mark.timeout(90)
async def test_a_kms_its_own_backend_denies_does_not_start(
    nats_server: NatsServer, store: EventStore, pki_dir: Path, webhook: Webhook, tmp_path: Path
) -> None:
    """`python -m pydstack.actors.kms --auth webhook`: the KMS asks bootAuth/kms about its own
    attested boot before serving; denied, it exits with one line naming the backend's reason,
    never serving, and puts no root on the log."""
    webhook.config["kms"] = {"allowAny": False}
    webhook.config["osImages"].append("")  # the simulated KMS TD names no OS image
    write_secret(tmp_path / "appkeys.json", create_dev_app_keys(b"\x42" * 20, now=0)[1])
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "pydstack.actors.kms", "--nats", nats_server.url, "--cluster",
         "selfauth", "--port", "0", "--key-file", str(tmp_path / "root.sealed"),
         "--seal-appkeys", str(tmp_path / "appkeys.json"), "--dev-pki", str(pki_dir),
         "--auth", "webhook", "--auth-url", webhook.url, "--signer-seed-file",
         str(write_secret(tmp_path / "kms.seed", os.urandom(32).hex()))],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and b"KMS_URL=" not in proc.stdout
    errors = [ln for ln in proc.stderr.decode().splitlines() if ln.startswith("Error:")]
    assert errors == [
        "Error: KMS self-authorization refused by backend webhook (bootAuth/kms): KMS not allowed"
    ], proc.stderr.decode()[-2000:]
    asked = [b for b in webhook.seen if b.get("appId")]
    assert asked and asked[-1]["appId"] == hashlib.sha256(b"pydstack-kms:selfauth").hexdigest()[:40]
    assert await kms_events(store, "selfauth") == []
    assert not (tmp_path / "root.sealed").exists()
    # Allowed, the same KMS starts and serves.
    webhook.config["kms"] = {"allowAny": True}
    launch = KmsLaunch(
        key_file=str(tmp_path / "root.sealed"), cluster="selfauth",
        seal_appkeys=str(tmp_path / "appkeys.json"), dev_pki=str(pki_dir), auth="webhook",
        auth_url=webhook.url,
    )  # fmt: skip
    async with running_kms(store, launch):
        assert [type(e) for e in await kms_events(store, "selfauth")] == [KmsRootCreated]


@contextlib.asynccontextmanager
async def cluster_kms(
    store: EventStore, pki: DevPki, tmp: Path, cluster: str
) -> AsyncIterator[tuple[KmsService, str]]:
    """A KMS of its own cluster on the shared log (its root created on first start)."""
    _, text = create_dev_app_keys(hashlib.sha256(cluster.encode()).digest()[:20], now=0)
    write_secret(tmp / f"{cluster}-appkeys.json", text)
    seal = KeyProviderSealKey(LocalKeyProvider(tmp / f"{cluster}-appkeys.json"))
    agent, _ = rig.kms_guest(pki, tmp, f"{cluster}-kms")
    await images.register_test_image(store)
    svc = await KmsService.open(
        store, KmsSettings(cluster=cluster, root_ca_der=pki.root_der, instance_id=cluster),
        backend=DevBackend(enabled=True), collateral=rig.CollateralBox(pki),
        keyfile=RootKeyFile(tmp / f"{cluster}.sealed", cluster, seal), attester=agent,
    )  # fmt: skip
    async with svc, serve_kms(svc) as url:
        yield svc, url


async def test_env_keys_are_pinned_to_the_clusters_root(
    store: EventStore, pki: DevPki, tmp_path: Path, nats_server: NatsServer
) -> None:
    """A second cluster's KMS (a genuine one: its root is on the same log) serves an env key
    signed by its own root. `env encrypt` for cluster main refuses it: over TLS (main's CA
    from the log) and, even with that KMS's CA given, by the signature, naming both roots; the
    dashboard's deploy form, pinned to main, refuses it too; main's own KMS is accepted."""
    async with (
        cluster_kms(store, pki, tmp_path, "main") as (main, main_url),
        cluster_kms(store, pki, tmp_path, "evil") as (evil, evil_url),
    ):
        (tmp_path / ".env").write_text("A=1\n")
        (tmp_path / "evil-ca.pem").write_text(evil.created.ca_cert_pem)
        base = ["encrypt", "--app-id", APP_ID.hex(), "--nats", nats_server.url,
                "--data-dir", str(tmp_path / "home")]  # fmt: skip

        def run(*extra: str) -> Any:
            return CliRunner().invoke(env_cli, [*base, *extra, str(tmp_path / ".env")])

        via_tls = await asyncio.to_thread(run, "--kms", evil_url)
        assert via_tls.exit_code == 1
        assert "does not serve a certificate of the pinned KMS CA" in via_tls.output
        by_root = await asyncio.to_thread(run, "--kms", evil_url, "--kms-ca",
                                          str(tmp_path / "evil-ca.pem"))  # fmt: skip
        assert by_root.exit_code == 1
        main_root, evil_root = main.root.k256_public().hex(), evil.root.k256_public().hex()
        line = f"env key signed by {evil_root}, not KMS cluster main's root {main_root}"
        assert line in by_root.output and len(by_root.output.strip().splitlines()) == 1
        ok = await asyncio.to_thread(run, "--kms", main_url)
        assert ok.exit_code == 0, ok.output
        # The dashboard folds the same log; pinned to cluster main, it refuses evil's key.
        state = LiveState()
        state.apply([r async for r in store.read(subject="dstack.kms.>")])
        with pytest.raises(EnvKeyError, match="CertificateError"):  # main's CA, from the log
            await KmsEnvKey(evil_url, cluster="main",
                            root=lambda: state.kms_root("main")).get(APP_ID.hex())  # fmt: skip
        with pytest.raises(EnvKeyError, match=f"not KMS cluster main's root {main_root}"):
            await KmsEnvKey(evil_url, cluster="main", root=lambda: state.kms_root("main"),
                            ca_pem=evil.created.ca_cert_pem).get(APP_ID.hex())  # fmt: skip
        good = KmsEnvKey(main_url, cluster="main", root=lambda: state.kms_root("main"))
        assert "cluster main" in (await good.get(APP_ID.hex())).detail


def self_signed(key: ec.EllipticCurvePrivateKey, cert: Any) -> ssl.SSLContext:
    from pydstack.adapters.tdx.ratls_tls import _pem_files

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    chain = cert.public_bytes(serialization.Encoding.PEM).decode()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()  # fmt: skip
    with _pem_files(chain, pem) as (c, k):
        ctx.load_cert_chain(c, k)
    return ctx


@contextlib.asynccontextmanager
async def fake_kms(ctx: ssl.SSLContext, seen: list[str]) -> AsyncIterator[str]:
    """A TLS server answering the KMS's RPC paths with made-up values."""

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"k256_pubkey": "02" + "11" * 32, "public_key": "22" * 32,
                                  "signature": "33" * 65, "timestamp": int(time.time()),
                                  "signature_v1": "44" * 65})  # fmt: skip

    app = web.Application()
    app.router.add_post("/prpc/{method}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_a_kms_client_without_a_pin_refuses_a_server_that_is_no_attested_kms(
    store: EventStore, pki: DevPki, tmp_path: Path
) -> None:
    """With no CA pinned, a KMS client sends nothing to a plain TLS server (self-signed) nor
    to an attested TD whose certificate is not a KMS's (`kms:rpc`); `env encrypt` says which.
    A real simulated KMS passes only under the dev PKI, and the client says it is simulated."""
    now = int(time.time())
    key = ec.generate_private_key(ec.SECP256R1())
    plain = build_ratls_cert(key, None, subject="kms.example", usage_server_auth=True,
                             not_before=now - 60, not_after=now + 3600)  # fmt: skip
    app_key = ec.generate_private_key(ec.SECP256R1())
    att = await make_cvm(pki).attest(ratls_report_data(app_key.public_key()))
    app_cert = build_ratls_cert(app_key, att, subject="app", usage_server_auth=True,
                                special_usage="app:rpc", not_before=now - 60,
                                not_after=now + 3600)  # fmt: skip
    seen: list[str] = []
    pki.save(tmp_path / "pki")
    (tmp_path / ".env").write_text("A=1\n")
    for ctx, why in ((self_signed(key, plain), "usage is None"),
                     (self_signed(app_key, app_cert), "usage is 'app:rpc'")):  # fmt: skip
        async with fake_kms(ctx, seen) as url:
            with pytest.raises(RaTlsPeerRefused, match=why):
                async with KmsClient(url, dev_pki=pki) as c:
                    await c.call("GetMeta")
            result = await asyncio.to_thread(
                CliRunner().invoke, env_cli,
                ["encrypt", "--app-id", APP_ID.hex(), "--kms", url, "--kms-root", "02" + "11" * 32,
                 "--kms-dev-pki", str(tmp_path / "pki"), "--data-dir", str(tmp_path / "home"),
                 str(tmp_path / ".env")],
            )  # fmt: skip
            assert result.exit_code == 1 and "is not an attested KMS" in result.output
    assert seen == []  # not one request reached them
    async with cluster_kms(store, pki, tmp_path, "main") as (_, url):
        with pytest.raises(RaTlsPeerRefused):  # a quote under another (dev) root
            async with KmsClient(url, dev_pki=DevPki.generate()) as c:
                await c.call("GetMeta")
        async with KmsClient(url, dev_pki=pki) as c:
            assert c.simulated and (await c.call("GetMeta"))["k256_pubkey"]
