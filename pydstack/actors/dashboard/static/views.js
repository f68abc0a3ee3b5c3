// The read-only pages: each names the views it shows (refreshed when they change), loads its
// JSON and renders it. VM rows carry the start/stop/remove buttons.

import { ago, api, code, fmtTime, h, table, toast } from "./util.js";

const pct = (used, total) => (total ? Math.round((100 * used) / total) : 0);

function bar(used, total, unit) {
  return h("div", { class: "usage" },
    h("meter", { min: 0, max: total || 1, value: used, high: total * 0.9 }),
    ` ${used} / ${total} ${unit} (${pct(used, total)}%)`);
}

function state(s) {
  return h("span", { class: `state state-${s}` }, s);
}

const hosts = {
  title: "Hosts", views: ["hosts"],
  load: () => api("/api/hosts"),
  render: (rows) => [h("h1", {}, "Hosts"), table("hosts", [
    "host", "address", "vCPU", "memory", "VMs", "CIDs", "heartbeat", "status"],
  rows.map((x) => h("tr", { dataset: { host: x.host_id } },
    h("td", {}, x.host_id), h("td", {}, x.address),
    h("td", {}, bar(x.vcpu_used, x.vcpu, "vCPU")),
    h("td", {}, bar(x.memory_used_mb, x.memory_mb, "MB")),
    h("td", {}, x.vms), h("td", {}, `${x.cid_start}+${x.cid_count}`),
    h("td", {}, ago(x.last_heartbeat_ns / 1e9)),
    h("td", {}, x.left ? state("left") : state("up")))), "no host has joined")],
};

const apps = {
  title: "Apps", views: ["apps"],
  load: () => api("/api/apps"),
  render: (rows) => [h("h1", {}, "Apps"), table("apps", [
    "app id", "name", "compose hash", "upgrades", "VMs", "registered", "status"],
  rows.map((a) => h("tr", { dataset: { app: a.app_id } },
    h("td", {}, code(a.app_id, 40)), h("td", {}, a.name), h("td", {}, code(a.compose_hash, 16)),
    h("td", {}, a.upgrades), h("td", {}, a.vms.length), h("td", {}, fmtTime(a.registered_ns)),
    h("td", {}, a.removed ? state("removed") : state("registered")))), "no app registered")],
};

async function command(vm, action) {
  try {
    const r = await api(`/api/vms/${encodeURIComponent(vm)}/${action}`, {});
    toast(`${r.event} appended for ${vm} (seq ${r.seq})`);
  } catch (err) {
    toast(err.message, "error");
  }
}

function actions(v) {
  const gone = v.state === "removed" || v.desired === "removed";
  const button = (action, label, disabled) => h("button", {
    type: "button", class: `act-${action}`, disabled: gone || disabled,
    dataset: { action, vm: v.vm_id }, onclick: () => command(v.vm_id, action) }, label);
  const runs = v.desired === "running" && !["exited", "stopped", "rejected"].includes(v.state);
  return [button("start", "Start", runs), button("stop", "Stop", v.desired === "stopped"),
    button("remove", "Remove", false)];
}

function boot(v) {
  if (v.last_error) return h("span", { class: "error" }, v.last_error);
  return v.boot_stage ? `${v.boot_stage}${v.boot_detail ? `: ${v.boot_detail}` : ""}` : "";
}

const vms = {
  title: "VMs", views: ["vms"],
  load: () => api("/api/vms"),
  render: (rows) => [h("h1", {}, "VMs"), table("vms", [
    "vm", "name", "app", "host", "state", "desired", "boot", "resources", "ports", "env", ""],
  rows.map((v) => h("tr", { dataset: { vm: v.vm_id, state: v.state, desired: v.desired } },
    h("td", {}, code(v.vm_id, 13)), h("td", {}, v.name), h("td", {}, code(v.app_id)),
    h("td", {}, v.host ? `${v.host} (cid ${v.cid})` : ""),
    h("td", { class: "vm-state" }, state(v.state), v.reason ? h("small", {}, ` ${v.reason}`) : ""),
    h("td", { class: "vm-desired" }, v.desired), h("td", {}, boot(v)),
    h("td", {}, `${v.resources.vcpu} vCPU, ${v.resources.memory_mb} MB, ${v.resources.disk_gb || 0} GB`),
    h("td", {}, (v.ports.length ? v.ports : v.requested_ports)
      .map((p) => `${p.host_port}→${p.vm_port}`).join(", ")),
    h("td", {}, v.encrypted_env.bytes ? `${v.encrypted_env.bytes} B sealed` : ""),
    h("td", { class: "actions" }, actions(v)))), "no VM requested")],
};

function bootInfo(b) {
  if (!b) return "";
  return h("details", {}, h("summary", {}, `tcb ${b.tcb_status || "?"}`),
    h("dl", {}, Object.entries(b).flatMap(([k, v]) => [h("dt", {}, k),
      h("dd", {}, Array.isArray(v) ? v.join(", ") : code(String(v), 64))])));
}

const keys = {
  title: "Keys", views: ["keys"],
  load: () => api("/api/keys"),
  render: (d) => [h("h1", {}, "KMS keys"),
    table("kms", ["cluster", "root k256", "replicas", "issued", "denied", "open"],
      d.clusters.map((c) => [c.cluster, c.root ? code(c.root.k256_public_key, 20) : "none",
        c.replicas.join(", "), c.issued, c.denied, c.open_requests.length]), "no KMS on the log"),
    h("h2", {}, "Decisions"),
    table("decisions", ["time", "outcome", "method", "app", "instance", "reason / verdict",
      "backend", "BootInfo"],
    d.decisions.map((k) => h("tr", { dataset: { request: k.request_id, outcome: k.outcome } },
      h("td", {}, fmtTime(k.decided_ns || k.requested_ns)), h("td", {}, state(k.outcome)),
      h("td", {}, k.method), h("td", {}, code(k.app_id)), h("td", {}, code(k.instance_id)),
      h("td", {}, k.reason), h("td", {}, k.backend), h("td", {}, bootInfo(k.boot_info)))),
    "no key requested")],
};

const gateways = {
  title: "Gateways", views: ["gateways"],
  load: () => api("/api/gateways"),
  render: (clusters) => [h("h1", {}, "Gateways and routes"),
    ...(clusters.length ? clusters : [null]).map((c) => c === null
      ? h("p", { class: "empty" }, "no gateway cluster on the log")
      : h("section", { class: "cluster", dataset: { cluster: c.cluster } },
        h("h2", {}, `cluster ${c.cluster}`, " ", code(c.digest, 16)),
        table(`nodes-${c.cluster}`, ["node", "endpoint", "tunnel IP", "base domain", "status"],
          c.gateways.map((g) => [g.node_id, g.endpoint, g.tunnel_ip, g.base_domain,
            state(g.up ? "up" : "down")]), "no node"),
        table(`routes-${c.cluster}`, ["instance", "app", "tunnel IP", "status", "last seen"],
          c.instances.map((i) => [code(i.instance_id), code(i.app_id), i.tunnel_ip,
            state(i.status), ago(i.last_seen)]), "no instance registered")))],
};

function eventRow(e) {
  const body = e.error || JSON.stringify(e.body);
  return h("tr", { dataset: { seq: e.seq, type: e.type }, class: e.error ? "bad" : "" },
    h("td", {}, e.seq), h("td", {}, fmtTime(e.time_ns)), h("td", {}, e.subject),
    h("td", {}, e.type), h("td", {}, e.actor),
    h("td", { class: "body", title: body }, body.length > 160 ? `${body.slice(0, 160)}…` : body));
}

function matches(e, f) {
  if (f.type && !f.type.split(",").map((t) => t.trim()).filter(Boolean).includes(e.type)) return false;
  if (!f.subject) return true;
  if (!/[*>]/.test(f.subject)) return e.subject.startsWith(f.subject);
  const p = f.subject.split("."), s = e.subject.split(".");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === ">") return s.length > i;
    if (i >= s.length || (p[i] !== "*" && p[i] !== s[i])) return false;
  }
  return s.length === p.length;
}

const filters = () => Object.fromEntries(["subject", "type"].map(
  (k) => [k, new URLSearchParams(location.search).get(k) || ""]));

const events = {
  title: "Events", views: [],
  load: () => api(`/api/events?${new URLSearchParams({ ...filters(), limit: 200 })}`),
  render: (rows) => {
    const f = filters();
    const form = h("form", { id: "filters", method: "get", action: "/events" },
      h("label", {}, "subject ", h("input", { name: "subject", value: f.subject,
        placeholder: "dstack.vm.* or a prefix" })),
      h("label", {}, "type ", h("input", { name: "type", value: f.type,
        placeholder: "VmRequested,VmScheduled" })),
      h("button", { type: "submit" }, "Filter"));
    return [h("h1", {}, "Event stream"), form,
      table("events", ["seq", "time", "subject", "type", "actor", "body"],
        rows.slice().reverse().map(eventRow), "no event matches")];
  },
  onEvents: (list) => {
    const body = document.querySelector("#events tbody");
    if (!body) return;
    const f = filters();
    for (const e of list) {
      if (!matches(e, f) || body.querySelector(`tr[data-seq="${e.seq}"]`)) continue;
      body.querySelector("td.empty")?.parentElement.remove();
      body.prepend(eventRow(e));
    }
  },
};

export const PAGES = { hosts, apps, vms, keys, gateways, events };
