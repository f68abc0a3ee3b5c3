"""2 gateway node processes with ACME (real pebble + pebble-challtestsrv): both race to order
their base domain's wildcard certificate, exactly one order lands, and both serve
``https://<app_id>.<domain>`` with that same certificate, chaining to pebble's root; the key is
on the log only sealed. Cut off from NATS, both keep serving it."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from pydstack.actors.decode import decode_message
from pydstack.adapters.acme import create_cluster_secret
from pydstack.adapters.tdx.pki import DevPki
from pydstack.adapters.wireguard import UserspaceBackend
from pydstack.core.events import CertificateIssued, CertificateRenewalStarted
from pydstack.core.gateway.certs import domain_subject
from tests.acme.pebble import missing_binaries, running_pebble
from tests.gateway.simcvm import DevCa
from tests.proxy.support import Pki

from .conftest import BASE, Cluster
from .cvms import fetch as cvm_fetch
from .procs import wait_identical
from .test_routes import _new_cvm, _write_files, eventually

if missing_binaries():
    pytest.skip("pebble not installed (Debian package pebble)", allow_module_level=True)


def _no_static_cert(files: dict[str, Path]) -> dict[str, Path]:
    return {k: v for k, v in files.items() if k not in ("chain", "key")}


@pytest.mark.timeout(180)
async def test_two_nodes_serve_one_pebble_certificate(cluster: Cluster) -> None:
    pki, ca, dev = Pki.create("cvm test CA"), DevCa.create(), DevPki.generate()
    cluster.files = _no_static_cert(_write_files(cluster.tmp, pki, ca, dev))
    secret = create_cluster_secret(cluster.tmp / "cluster.secret")
    async with running_pebble(cluster.tmp / "pebble", host=cluster.lan.host_ip) as peb:
        acme = (
            "--cluster-secret", str(secret), "--acme-directory", peb.directory_url,
            "--acme-ca-bundle", peb.ca_bundle, "--challtestsrv", peb.challtestsrv_url,
        )  # fmt: skip
        gws = list(await asyncio.gather(*(cluster.node(n, extra=acme) for n in (1, 2))))
        await cluster.lan.add("client")
        client = cluster.lan.ns("client")
        cvm = await _new_cvm(cluster, "cvm1", dev, pki)
        try:
            await cvm.register(gws[0].registration_url, ca, UserspaceBackend(cluster.tmp / "wg"),
                               prefix=21)  # fmt: skip
            await wait_identical(gws, min_peers=1)
            root = (await peb.root_pem()).decode()
            host = f"{cvm.app_id}.{BASE}"

            async def served(address: str) -> bytes:
                body, cert = await cvm_fetch(client, address, host, root)
                assert body == b"cvm1|80" and cert is not None
                return cert

            certs = [await eventually(lambda g=g: served(g.address), 60) for g in gws]  # type: ignore[misc]
            assert certs[0] == certs[1]  # the same certificate on both nodes
            leaf = x509.load_der_x509_certificate(certs[0])
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert f"*.{BASE}" in names.value.get_values_for_type(x509.DNSName)
            with pytest.raises(ssl.SSLCertVerificationError):  # pebble's chain, no other
                await cvm_fetch(client, gws[0].address, host, pki.pem.decode())
            statuses = [await g.status() for g in gws]
            serving = {s["certificates"][BASE] for s in statuses}
            assert len(serving) == 1 and None not in serving

            # One order for the cluster, whatever the race; the key never in the clear.
            recs, _ = await cluster.store.read_aggregate(domain_subject("default", BASE))
            kinds = [type(decode_message(r.subject, r.data)[1]) for r in recs]
            assert kinds.count(CertificateRenewalStarted) == kinds.count(CertificateIssued) == 1
            async for rec in cluster.store.read():
                assert b"PRIVATE KEY" not in rec.data

            # NATS gone: both nodes keep serving the certificate (new handshakes).
            await cluster.nats.stop()

            async def cut_off() -> None:
                assert not any([(await g.status())["connected"] for g in gws])

            await eventually(cut_off)
            for g in gws:
                assert await served(g.address) == certs[0]
        finally:
            await cvm.close()
            for g in gws:
                await g.stop()
