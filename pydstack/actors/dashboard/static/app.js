// The dashboard shell: picks the page from the URL, loads its JSON, and re-renders it when the
// server-sent event stream says one of its views changed.

import { h, seen, toast } from "./util.js";
import { PAGES } from "./views.js";
import { deployPage } from "./deploy.js";

const ALL = { ...PAGES, deploy: deployPage };
const name = location.pathname.replace(/^\/+|\/+$/g, "") || "vms";
const page = ALL[name] || ALL.vms;
const root = document.getElementById("view");
let pending = null;
let seq = 0;

function setLive(state, text) {
  document.body.dataset.live = state;
  document.getElementById("live").textContent = text;
}

async function refresh() {
  try {
    const data = await page.load();
    root.replaceChildren(...[].concat(page.render(data, { refresh })));
    root.dataset.loaded = String(Number(root.dataset.loaded || 0) + 1);
  } catch (err) {
    root.replaceChildren(h("p", { class: "error" }, `could not load: ${err.message}`));
  }
}

function refreshSoon() {
  if (pending) return;
  pending = setTimeout(() => { pending = null; refresh(); }, 100);
}

function connect() {
  // EventSource reconnects by itself and sends Last-Event-ID, so nothing is missed.
  const source = new EventSource(`/api/stream?since=${seq}`);
  source.addEventListener("hello", (e) => {
    seq = Math.max(seq, JSON.parse(e.data).seq);
    document.body.dataset.seq = String(seq);
    setLive("live", `live · seq ${seq}`);
  });
  source.addEventListener("update", (e) => {
    const upd = JSON.parse(e.data);
    seq = Math.max(seq, upd.seq);
    document.body.dataset.seq = String(seq);
    setLive("live", `live · seq ${seq}`);
    if (page.onEvents && upd.events.length) page.onEvents(upd.events);
    if ((page.views || []).some((v) => upd.views.includes(v))) refreshSoon();
  });
  source.onerror = () => setLive("down", "reconnecting…");
}

// Opened as /?token=LOGIN once: the server set the login cookie; the token leaves the URL bar.
const query = new URLSearchParams(location.search);
if (query.has("token")) {
  query.delete("token");
  const rest = query.toString();
  history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : "") + location.hash);
}

for (const a of document.querySelectorAll("nav a")) {
  if (a.getAttribute("href") === `/${name}`) a.setAttribute("aria-current", "page");
}
document.title = `pydstack · ${page.title}`;
window.addEventListener("unhandledrejection", (e) => toast(String(e.reason?.message || e.reason), "error"));
await refresh();
seq = seen.seq; // the stream starts after what the page shows: no gap, no repeat
connect();
