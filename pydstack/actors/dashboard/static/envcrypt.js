// dstack's encrypted env vars, in the browser (WebCrypto X25519 + AES-256-GCM).
//
// Same format as dstack-sdk's encrypt_env_vars and pydstack.core.kms.envcrypt:
//   plaintext = JSON {"env": [{"key": k, "value": v}, ...]}
//   output    = ephemeral_public(32) || iv(12) || AES-GCM(key = X25519(ephemeral, app_pub), iv)
// The shared secret is the AES key as is (no KDF, no AAD). Needs a secure context: WebCrypto
// X25519 exists on https and on http://127.0.0.1 / localhost only.

import { bytesToHex, hexToBytes } from "./util.js";

/** KEY=VALUE lines (# comments, blank lines, "export " and matching quotes allowed). */
export function parseEnv(text) {
  const out = [];
  text.split(/\r?\n/).forEach((line, i) => {
    let s = line.trim();
    if (!s || s.startsWith("#")) return;
    s = s.replace(/^export\s+/, "");
    const eq = s.indexOf("=");
    const key = eq > 0 ? s.slice(0, eq).trim() : "";
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) {
      throw new Error(`env line ${i + 1}: expected KEY=VALUE, got ${JSON.stringify(line)}`);
    }
    let value = s.slice(eq + 1).trim();
    if (value.length >= 2 && value[0] === value.at(-1) && `'"`.includes(value[0])) {
      value = value.slice(1, -1);
    }
    out.push([key, value]);
  });
  return out;
}

/** Seal [[key, value], ...] to a 32-byte X25519 public key (hex); returns hex. */
export async function encryptEnvVars(envs, publicKeyHex) {
  if (!globalThis.crypto?.subtle) {
    throw new Error("WebCrypto is unavailable: open the dashboard at http://127.0.0.1 or localhost");
  }
  const pub = hexToBytes(publicKeyHex);
  if (pub.length !== 32) throw new Error(`env key has ${pub.length} bytes, expected 32`);
  const subtle = crypto.subtle;
  const eph = await subtle.generateKey({ name: "X25519" }, true, ["deriveBits"]);
  const peer = await subtle.importKey("raw", pub, { name: "X25519" }, false, []);
  const shared = await subtle.deriveBits({ name: "X25519", public: peer }, eph.privateKey, 256);
  const key = await subtle.importKey("raw", shared, { name: "AES-GCM" }, false, ["encrypt"]);
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const plaintext = new TextEncoder().encode(
    JSON.stringify({ env: envs.map(([k, v]) => ({ key: k, value: v })) }));
  const sealed = new Uint8Array(await subtle.encrypt({ name: "AES-GCM", iv }, key, plaintext));
  const ephPub = new Uint8Array(await subtle.exportKey("raw", eph.publicKey));
  const out = new Uint8Array(32 + 12 + sealed.length);
  out.set(ephPub, 0);
  out.set(iv, 32);
  out.set(sealed, 44);
  return bytesToHex(out);
}
