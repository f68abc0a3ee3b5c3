"""Every call of dstack's Python SDK (dstack-sdk 0.5) against one agent, answers collected in
the shape `jssdk.check_js_results` checks (the JavaScript driver's names), so both SDKs pass
the same checks."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

from dstack_sdk import AsyncDstackClient, AsyncTappdClient, DstackClient

from .tlscheck import TlsOptions


async def run_py_sdk(dstack: str, tappd: str | None, options: list[TlsOptions]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with AsyncDstackClient(dstack, timeout=30) as c:
        out["version"] = {"version": (await c.version()).version}
        out["isReachable"] = await c.is_reachable()
        info = await c.info()
        out["info"] = {"app_id": info.app_id, "app_cert": info.app_cert,
                       "tcb_info": info.tcb_info.model_dump()}  # fmt: skip
        q = await c.get_quote(b"js-nonce")
        out["getQuote"] = {"quote": q.quote, "event_log": q.event_log,
                           "rtmrs": list(q.replay_rtmrs().values())}  # fmt: skip
        out["attest"] = {"attestation": (await c.attest(b"js-attest")).attestation}
        await c.emit_event("js-event", b"js-payload")
        q = await c.get_quote(b"after-event")
        out["emitEvent"] = {"quote": q.quote, "event_log": q.event_log}
        for name, algo in (("default", None), ("secp256k1", "secp256k1"), ("k256", "k256"),
                           ("ed25519", "ed25519")):  # fmt: skip
            k = await (c.get_key("wallet/js", "signing") if algo is None
                       else c.get_key("wallet/js", "signing", algo))  # fmt: skip
            out[f"getKey:{name}"] = {"key": k.key, "signature_chain": k.signature_chain}
        t = await c.get_tls_key()
        out["getTlsKey:default"] = {"key": t.key, "certificate_chain": t.certificate_chain,
                                    "u8": t.as_uint8array(32).hex()}  # fmt: skip
        for i, o in enumerate(options):
            t = await c.get_tls_key(
                subject=o.subject, alt_names=list(o.alt_names), usage_ra_tls=o.usage_ra_tls,
                usage_server_auth=o.usage_server_auth, usage_client_auth=o.usage_client_auth,
                with_app_info=o.with_app_info, not_before=o.not_before, not_after=o.not_after,
            )  # fmt: skip
            out[f"getTlsKey:{i}"] = {"key": t.key, "certificate_chain": t.certificate_chain}
        digest = bytes([7]) * 32
        for algo, data in (("secp256k1", b"js-msg"), ("ed25519", b"js-msg"),
                           ("secp256k1_prehashed", digest)):  # fmt: skip
            s = await c.sign(algo, data)
            other = bytes([8]) * 32 if algo == "secp256k1_prehashed" else b"other"
            sig, pub = s.decode_signature(), s.decode_public_key()
            out[f"sign:{algo}"] = {
                "signature": s.signature, "public_key": s.public_key, "data": data.hex(),
                "signature_chain": s.signature_chain,
                "valid": (await c.verify(algo, data, sig, pub)).valid,
                "other_valid": (await c.verify(algo, other, sig, pub)).valid,
            }  # fmt: skip
    # The sync client wraps the async one: one call shows it works on this socket too.
    sync = DstackClient(dstack)
    q = await asyncio.to_thread(sync.get_quote, b"raw-data")
    out["tdxQuote:raw"] = {"quote": q.quote, "event_log": q.event_log}
    out["deriveKey"] = {"error": "deriveKey is deprecated, please use getKey instead."}
    if tappd is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            async with AsyncTappdClient(tappd, timeout=30) as tc:
                out["tappd.isReachable"] = await tc.is_reachable()
                dk = await tc.derive_key("js/path", "js.example", ["js.example", "192.0.2.7"])
                out["tappd.deriveKey"] = {"key": dk.key, "certificate_chain": dk.certificate_chain}
                for algo in ("raw", "sha256", "keccak256"):
                    tq = await tc.tdx_quote(b"js-tappd", algo)
                    out[f"tappd.tdxQuote:{algo}"] = {
                        "quote": tq.quote, "event_log": tq.event_log,
                        "hash_algorithm": algo,
                    }  # fmt: skip
                out["tappd.info"] = {"app_id": (await tc.info()).app_id}
    return out
