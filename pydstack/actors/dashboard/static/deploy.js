// The deploy form: compose + env + ports + resources -> app-compose (built by the server, its
// hash re-checked here), env vars sealed in this browser to the app's env key, then one POST
// that appends AppRegistered + VmRequested.

import { encryptEnvVars, parseEnv } from "./envcrypt.js";
import { api, h, sha256Hex, toast } from "./util.js";

const SAMPLE = `services:
  web:
    image: nginx:alpine
    ports:
      - "80:80"
`;

function field(label, input, hint) {
  return h("label", { class: "field" }, h("span", {}, label), input,
    hint ? h("small", {}, hint) : null);
}

function form() {
  const f = h("form", { id: "deploy-form", autocomplete: "off" },
    field("Name", h("input", { id: "name", name: "name", required: true, value: "my-app" })),
    field("docker-compose.yaml or app-compose.json",
      h("textarea", { id: "compose", name: "compose", rows: 10, spellcheck: "false" }, SAMPLE),
      h("input", { id: "compose-file", type: "file", accept: ".yaml,.yml,.json,text/*" })),
    field("Environment (KEY=VALUE per line, sealed in this browser)",
      h("textarea", { id: "env", name: "env", rows: 4, spellcheck: "false",
        placeholder: "API_TOKEN=secret" })),
    field("Ports", h("input", { id: "ports", name: "ports", placeholder: "8080:80, tcp:127.0.0.1:8443:443" })),
    h("div", { class: "row" },
      field("vCPU", h("input", { id: "vcpu", name: "vcpu", type: "number", min: 1, value: 1 })),
      field("Memory (MB)", h("input", { id: "memory", name: "memory", type: "number", min: 64, value: 2048 })),
      field("Disk (GB)", h("input", { id: "disk", name: "disk", type: "number", min: 1, value: 20 })),
      field("Host (optional)", h("input", { id: "host", name: "host" })),
      field("Image (optional)", h("input", { id: "image", name: "image" }))),
    h("div", { class: "row checks" },
      ...[["kms_enabled", "KMS", true], ["gateway_enabled", "gateway", true],
        ["public_logs", "public logs", true], ["public_sysinfo", "public sysinfo", true]]
        .map(([id, label, on]) => h("label", {}, h("input", { id, type: "checkbox", checked: on }), ` ${label}`))),
    h("div", { class: "row" },
      h("button", { id: "preview", type: "button" }, "Build app-compose"),
      h("button", { id: "deploy", type: "submit" }, "Encrypt env & deploy")));
  return f;
}

const val = (id) => document.getElementById(id).value;
const checked = (id) => document.getElementById(id).checked;

function composeRequest(envNames) {
  return {
    name: val("name"), compose: val("compose"), env_names: envNames,
    kms_enabled: checked("kms_enabled"), gateway_enabled: checked("gateway_enabled"),
    public_logs: checked("public_logs"), public_sysinfo: checked("public_sysinfo"),
  };
}

function showPreview(p, hashOk) {
  const out = document.getElementById("preview-out");
  const key = p.env_key;
  out.replaceChildren(h("dl", {},
    h("dt", {}, "app id"), h("dd", {}, h("code", { id: "app-id" }, p.app_id)),
    h("dt", {}, "compose hash"), h("dd", {}, h("code", { id: "compose-hash" }, p.compose_hash),
      h("span", { id: "hash-check", class: hashOk ? "ok" : "error" },
        hashOk ? " ✓ sha256 re-computed in this browser" : " ✗ does not match the app-compose")),
    h("dt", {}, "app"), h("dd", {}, p.app_status),
    h("dt", {}, "allowed_envs"), h("dd", {}, p.allowed_envs.join(", ") || "(none)"),
    h("dt", {}, "env key"), h("dd", { id: "env-key", dataset: { source: key ? key.source : "none" } },
      key ? [h("code", {}, key.public_key), h("br"), h("strong", {}, key.source === "kms" ? "from the KMS" : "development key"),
        ` — ${key.detail}`] : h("span", { class: "error" }, p.env_key_error))),
  h("details", {}, h("summary", {}, "app-compose.json"), h("pre", { id: "app-compose" }, p.app_compose)));
}

let current = null; // the preview the deploy button will use

async function preview() {
  const envs = parseEnv(val("env"));
  const p = await api("/api/compose", composeRequest(envs.map(([k]) => k)));
  const hashOk = (await sha256Hex(p.app_compose)) === p.compose_hash;
  showPreview(p, hashOk);
  if (!hashOk) throw new Error("the server's compose hash does not match its app-compose");
  current = { p, envs };
  return current;
}

async function deploy(ev) {
  ev.preventDefault();
  const result = document.getElementById("result");
  result.replaceChildren(h("p", {}, "building the app-compose…"));
  try {
    const { p, envs } = await preview();
    let sealed = "";
    if (envs.length) {
      if (!p.env_key) throw new Error(`no env key: ${p.env_key_error}`);
      sealed = await encryptEnvVars(envs, p.env_key.public_key);
    }
    const ports = val("ports").split(/[\s,]+/).filter(Boolean);
    const r = await api("/api/deploy", {
      app_compose: p.app_compose, compose_hash: p.compose_hash, name: val("name"),
      encrypted_env: sealed, env_names: envs.map(([k]) => k), ports,
      vcpu: Number(val("vcpu")), memory_mb: Number(val("memory")), disk_gb: Number(val("disk")),
      host: val("host"), image: val("image"),
    });
    result.replaceChildren(h("p", { id: "deployed", class: "ok", dataset: { vm: r.vm_id, app: r.app_id } },
      `app ${r.app} (${r.app_id}); VM `, h("a", { href: "/vms" }, r.vm_id), ` requested at seq ${r.seq}`,
      sealed ? `; ${envs.length} env var(s) sealed to the ${p.env_key.source} key` : ""));
    toast(`deployed ${r.vm_id}`);
  } catch (err) {
    result.replaceChildren(h("p", { id: "deploy-error", class: "error" }, err.message));
  }
}

export const deployPage = {
  title: "Deploy", views: [],
  load: async () => null,
  render: () => {
    const f = form();
    f.addEventListener("submit", deploy);
    f.querySelector("#preview").addEventListener("click", () =>
      preview().catch((err) => toast(err.message, "error")));
    f.querySelector("#compose-file").addEventListener("change", async (e) => {
      const file = e.target.files[0];
      if (file) f.querySelector("#compose").value = await file.text();
    });
    return [h("h1", {}, "Deploy an app"), f, h("section", { id: "preview-out" }),
      h("section", { id: "result" })];
  },
};
