// Small DOM and fetch helpers shared by every page (no framework, no build step).

/** Build an element: h("td", {class: "x"}, "text", child, ...). Strings become text nodes. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** A table with a header row; rows are arrays of cells (strings or nodes). */
export function table(id, headers, rows, empty = "nothing yet") {
  const body = rows.length
    ? rows.map((r) => (r instanceof Node ? r : h("tr", {}, r.map((c) => h("td", {}, c)))))
    : [h("tr", {}, h("td", { colspan: headers.length, class: "empty" }, empty))];
  return h("table", { id }, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, body));
}

export class ApiError extends Error {}

/** The highest stream sequence any answer was built from (the X-Pydstack-Seq header). */
export const seen = { seq: 0 };

/** This dashboard process's CSRF token: the server put it in the page and wants it back on
 * every write (a page under another name cannot read it). */
const csrfToken = document.querySelector('meta[name="csrf-token"]')?.content || "";

/** GET or POST JSON; a non-2xx answer throws ApiError with the server's one-line error. */
export async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken },
    body: JSON.stringify(body),
  };
  const resp = await fetch(path, init);
  seen.seq = Math.max(seen.seq, Number(resp.headers.get("X-Pydstack-Seq") || 0));
  const data = await resp.json().catch(() => ({ error: `${resp.status} ${resp.statusText}` }));
  if (!resp.ok) throw new ApiError(data.error || `${resp.status}`);
  return data;
}

export function short(id, n = 12) {
  return id && id.length > n ? `${id.slice(0, n)}…` : id || "";
}

export function code(text, n = 12) {
  return h("code", { title: text || "" }, short(text, n));
}

export function fmtTime(ns) {
  if (!ns) return "";
  return new Date(Number(ns) / 1e6).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

export function ago(seconds) {
  if (!seconds) return "never";
  const s = Math.max(0, Math.round(Date.now() / 1000 - seconds));
  return s < 90 ? `${s}s ago` : s < 5400 ? `${Math.round(s / 60)}m ago` : `${Math.round(s / 3600)}h ago`;
}

export function toast(text, kind = "info") {
  const el = document.getElementById("toast");
  el.textContent = text;
  el.dataset.kind = kind;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 6000);
}

export function bytesToHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function hexToBytes(hex) {
  const clean = hex.replace(/^0x/, "");
  if (clean.length % 2 || /[^0-9a-fA-F]/.test(clean)) throw new Error(`not hex: ${short(hex)}`);
  return Uint8Array.from(clean.match(/../g) || [], (x) => parseInt(x, 16));
}

export async function sha256Hex(text) {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return bytesToHex(new Uint8Array(digest));
}
