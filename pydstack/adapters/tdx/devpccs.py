"""A PCCS-shaped HTTP server for the dev PKI, so the networked collateral path runs offline.

It answers the Intel PCS v4 endpoints that dcap-qvl's `get_collateral` requests (PCK CRL,
TDX TCB info, TD QE identity, root CA CRL) with the `DevPki`'s collateral, issued for the
`now` the caller chooses. Only for development and tests: it serves a dev trust chain.

    app = devpccs_app(pki, now=lambda: int(time.time()))
    # dcap-qvl: await get_collateral("http://127.0.0.1:PORT", quote)
    source = dev_collateral(pki)          # or a DevPki directory, loaded on first use
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote as urlquote

from aiohttp import web

from .collateral import Collateral, CollateralCache, collateral_from_json
from .pki import DevPki


def dev_collateral(pki: DevPki | str | os.PathLike[str], **kw: Any) -> CollateralCache:
    """The dev PKI's collateral (issued now, valid 30 days) behind the `CollateralCache` every
    verifier uses, as a PCCS's would be; `pki` a directory is loaded on the first quote;
    `kw`: `CollateralCache`'s options."""
    box: list[DevPki] = [pki] if isinstance(pki, DevPki) else []

    async def issue(quote: bytes) -> Collateral:
        if not box:
            assert not isinstance(pki, DevPki)  # else box held it from the start
            box.append(DevPki.load(pki))
        return collateral_from_json(box[0].collateral_json(int(time.time())))

    return CollateralCache(issue, **kw)


def devpccs_app(pki: DevPki, now: Callable[[], int]) -> web.Application:
    def collateral() -> dict[str, str]:
        return pki.collateral(now())

    async def pck_crl(request: web.Request) -> web.Response:
        c = collateral()
        # PCCS sends issuer chains URL-encoded in headers; the CRL body is DER.
        headers = {"SGX-PCK-CRL-Issuer-Chain": urlquote(c["pck_crl_issuer_chain"])}
        return web.Response(body=bytes.fromhex(c["pck_crl"]), headers=headers)

    async def tcb(request: web.Request) -> web.Response:
        c = collateral()
        fmspc = request.query.get("fmspc", "")
        if fmspc.upper() != pki.params.fmspc.hex().upper():
            return web.Response(status=404, text=f"no TCB info for fmspc {fmspc}")
        body = {"tcbInfo": json.loads(c["tcb_info"]), "signature": c["tcb_info_signature"]}
        headers = {"TCB-Info-Issuer-Chain": urlquote(c["tcb_info_issuer_chain"])}
        return web.json_response(body, headers=headers)

    async def qe_identity(request: web.Request) -> web.Response:
        c = collateral()
        body = {
            "enclaveIdentity": json.loads(c["qe_identity"]),
            "signature": c["qe_identity_signature"],
        }
        headers = {"SGX-Enclave-Identity-Issuer-Chain": urlquote(c["qe_identity_issuer_chain"])}
        return web.json_response(body, headers=headers)

    async def root_ca_crl(request: web.Request) -> web.Response:
        return web.Response(text=collateral()["root_ca_crl"])  # PCCS returns it as hex text

    app = web.Application()
    app.router.add_get("/sgx/certification/v4/pckcrl", pck_crl)
    app.router.add_get("/tdx/certification/v4/tcb", tcb)
    app.router.add_get("/tdx/certification/v4/qe/identity", qe_identity)
    app.router.add_get("/sgx/certification/v4/rootcacrl", root_ca_crl)
    return app
