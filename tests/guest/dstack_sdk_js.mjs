// Every call of dstack's JavaScript SDK (@phala/dstack-sdk 0.5) against one guest agent.
// Run by tests/guest/jssdk.py: `node dstack_sdk_js.mjs '<json config>'`, with DSTACK_SDK_JS
// naming the npm prefix the Makefile installs the SDK into (.venv/dstack-sdk-js). Prints one
// JSON object: each call's answer (bytes as hex) or {"error": message}; the Python test checks
// them with pydstack's own verifiers.
import { createRequire } from "node:module";

const require = createRequire(process.env.DSTACK_SDK_JS + "/driver.js");
const { DstackClient, TappdClient, to_hex } = require("@phala/dstack-sdk");

const cfg = JSON.parse(process.argv[2]);
const hex = (u) => Buffer.from(u).toString("hex");
const out = {};

async function call(name, fn) {
  try {
    out[name] = await fn();
  } catch (e) {
    out[name] = { error: String(e && e.message ? e.message : e) };
  }
}

console.warn = () => {}; // the SDK warns on every deprecated call; keep stderr for failures

const c = new DstackClient(cfg.dstack);
await call("version", async () => ({ ...(await c.version()) }));
await call("isReachable", () => c.isReachable());
await call("info", async () => ({ ...(await c.info()) }));
await call("getQuote", async () => {
  const q = await c.getQuote("js-nonce");
  return { quote: q.quote, event_log: q.event_log, report_data: q.report_data, rtmrs: q.replayRtmrs() };
});
await call("attest", async () => ({ attestation: (await c.attest("js-attest")).attestation }));
await call("emitEvent", async () => {
  await c.emitEvent("js-event", "js-payload");
  const q = await c.getQuote("after-event");
  return { quote: q.quote, event_log: q.event_log };
});
for (const algo of [undefined, "secp256k1", "k256", "ed25519"]) {
  await call(`getKey:${algo ?? "default"}`, async () => {
    const k = algo === undefined ? await c.getKey("wallet/js", "signing") : await c.getKey("wallet/js", "signing", algo);
    return { key: hex(k.key), signature_chain: k.signature_chain.map(hex) };
  });
}
await call("getTlsKey:default", async () => {
  const r = await c.getTlsKey();
  return { key: r.key, certificate_chain: r.certificate_chain, u8: hex(r.asUint8Array(32)) };
});
for (const [i, o] of cfg.tls_options.entries()) {
  await call(`getTlsKey:${i}`, async () => {
    const r = await c.getTlsKey({
      subject: o.subject, altNames: o.alt_names, usageRaTls: o.usage_ra_tls,
      usageServerAuth: o.usage_server_auth, usageClientAuth: o.usage_client_auth,
      withAppInfo: o.with_app_info, notBefore: o.not_before ?? undefined,
      notAfter: o.not_after ?? undefined,
    });
    return { key: r.key, certificate_chain: r.certificate_chain };
  });
}
const digest = Buffer.alloc(32, 7);
for (const [algo, data] of [["secp256k1", "js-msg"], ["ed25519", "js-msg"], ["secp256k1_prehashed", digest]]) {
  await call(`sign:${algo}`, async () => {
    const s = await c.sign(algo, data);
    const ok = await c.verify(algo, data, s.signature, s.public_key);
    const bad = await c.verify(algo, algo === "secp256k1_prehashed" ? Buffer.alloc(32, 8) : "other", s.signature, s.public_key);
    return { signature: hex(s.signature), public_key: hex(s.public_key), signature_chain: s.signature_chain.map(hex), data: to_hex(data), valid: ok.valid, other_valid: bad.valid };
  });
}
await call("tdxQuote:raw", async () => ({ ...(await c.tdxQuote("raw-data", "raw")) }));
await call("deriveKey", () => c.deriveKey("x"));

if (cfg.tappd) {
  const t = new TappdClient(cfg.tappd);
  await call("tappd.isReachable", () => t.isReachable());
  await call("tappd.deriveKey", async () => {
    const r = await t.deriveKey("js/path", "js.example", ["js.example", "192.0.2.7"]);
    return { key: r.key, certificate_chain: r.certificate_chain };
  });
  for (const algo of ["raw", "sha256", "keccak256"]) {
    await call(`tappd.tdxQuote:${algo}`, async () => {
      const q = await t.tdxQuote("js-tappd", algo);
      return { quote: q.quote, event_log: q.event_log, hash_algorithm: q.hash_algorithm, prefix: q.prefix };
    });
  }
  await call("tappd.info", async () => ({ ...(await t.info()) }));
}
process.stdout.write(JSON.stringify(out));
