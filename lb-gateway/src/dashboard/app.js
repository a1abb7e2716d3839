// The dashboard page: polls /ui/api/* once a second and redraws each panel from the answer.
// Everything shown is built with DOM calls and textContent (names and metadata come from
// registrations and config authors: never parsed as HTML).
"use strict";

const POLL_MS = 1000;
const api = (path) => "api/" + path;

// ---- small DOM helpers ------------------------------------------------------------------

function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k.startsWith("data-")) el.setAttribute(k, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const svgNs = "http://www.w3.org/2000/svg";
function s(tag, attrs) {
  const el = document.createElementNS(svgNs, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

function table(headers, rows) {
  return h("table", {},
    h("thead", {}, h("tr", {}, headers.map((x) =>
      typeof x === "string" ? h("th", { text: x }) : h("th", x)))),
    h("tbody", {}, rows));
}

function badge(text, cls) {
  return h("span", { class: "badge " + (cls || text), text });
}

function bytes(n) {
  if (n === undefined || n === null) return "";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function when(ms) {
  return ms ? new Date(ms).toLocaleString() : "";
}

// The colour of a route's i-th backend (backends are sorted by address): hues a golden angle
// apart, so neighbours on the ring stay distinct however many there are.
function colour(i) {
  return "hsl(" + ((i * 137.508) % 360).toFixed(1) + ", 65%, 50%)";
}

// Fetches JSON; a non-2xx answer or a network failure throws an Error with the message to show.
async function getJson(path) {
  let resp;
  try {
    resp = await fetch(api(path), { cache: "no-store" });
  } catch (e) {
    throw new Error("the gateway does not answer: " + e.message);
  }
  let body = null;
  try { body = await resp.json(); } catch (e) { /* not JSON */ }
  if (!resp.ok) {
    const msg = body && body.error ? body.error : resp.status + " " + resp.statusText;
    throw new Error(msg + " (HTTP " + resp.status + ")");
  }
  return body;
}

function showError(panel, err) {
  const box = panel.querySelector(":scope > .error");
  if (err) {
    box.textContent = err.message || String(err);
    box.hidden = false;
  } else {
    box.hidden = true;
    box.textContent = "";
  }
}

function setBody(panel, ...nodes) {
  panel.querySelector(":scope > .body").replaceChildren(...nodes);
}

function setSummary(panel, text) {
  const el = panel.querySelector(":scope > .summary");
  if (el) el.textContent = text;
}

// ---- cluster ------------------------------------------------------------------------------

function renderCluster(data) {
  const panel = document.getElementById("cluster");
  const leader = data.members.find((m) => m.leader);
  setSummary(panel,
    data.members.length + " member(s); leader " + (leader ? (leader.name || leader.id) : "unknown") +
    "; term " + (data.term ?? "?") + "; revision " + (data.revision ?? "?"));
  const rows = data.members.map((m) => h("tr", {
      "data-member-id": m.id, "data-leader": m.leader ? "true" : "false", "data-health": m.health,
    },
    h("td", {}, m.name || h("span", { class: "muted", text: "(unnamed)" }),
      m.leader ? [" ", badge("leader", "leader")] : null,
      m.is_learner ? [" ", badge("learner", "muted")] : null),
    h("td", { class: "mono", text: m.id }),
    h("td", {}, badge(m.health), m.error ? h("div", { class: "muted", text: m.error }) : null),
    h("td", { class: "num term", text: m.term ?? "" }),
    h("td", { class: "num revision", text: m.revision ?? "" }),
    h("td", { class: "num", text: m.raft_index ?? "" }),
    h("td", { class: "num", text: bytes(m.db_size) }),
    h("td", { text: (m.client_urls || []).join(", ") }),
  ));
  setBody(panel, table(["member", "ID", "health",
    { class: "num", text: "term" }, { class: "num", text: "revision" },
    { class: "num", text: "raft index" }, { class: "num", text: "DB size" }, "client URLs"], rows));
  panel.querySelector(".body table").id = "cluster-members";
}

// ---- services -----------------------------------------------------------------------------

function renderServices(data) {
  const panel = document.getElementById("services");
  let services = 0, instances = 0;
  const blocks = [];
  for (const ns of data.namespaces) {
    for (const svc of ns.services) {
      services++;
      instances += svc.instances.length;
      const rows = svc.instances.map((i) => h("tr", { "data-instance-id": i.instance_id, "data-health": i.health },
        h("td", { text: i.instance_id }),
        h("td", { text: i.address + ":" + i.port }),
        h("td", { text: i.protocol }),
        h("td", {}, badge(i.health), i.health_detail ? h("div", { class: "muted", text: i.health_detail }) : null),
        h("td", { class: "num weight", text: i.weight }),
        h("td", { text: i.zone || "" }),
        h("td", { text: (i.tags || []).join(", ") }),
      ));
      blocks.push(h("div", { class: "service", "data-service": ns.namespace + "/" + svc.service },
        h("h3", {}, ns.namespace + " / " + svc.service + " ",
          h("span", { class: "muted", text: svc.healthy + "/" + svc.total + " healthy" +
            (svc.routes.length ? "; routes: " + svc.routes.join(", ") : "") })),
        svc.instances.length
          ? table(["instance", "address", "protocol", "health", { class: "num", text: "weight" }, "zone", "tags"], rows)
          : h("div", { class: "muted", text: "no instances" })));
    }
  }
  setSummary(panel, services + " service(s), " + instances + " instance(s); registry revision " + data.revision);
  setBody(panel, ...(blocks.length ? blocks : [h("div", { class: "muted", text: "nothing registered" })]));
}

// ---- config -------------------------------------------------------------------------------

const config = {
  selected: null,      // "ns/group/key"
  seen: null,          // "current/latest" of the selected item when its detail was last loaded
  history: [],
  auto: true,          // the diff follows the two newest versions until the user picks others
};

function itemId(it) {
  return it.item.namespace + "/" + it.item.group + "/" + it.item.key;
}

function rolloutText(it) {
  if (!it.rollout) return "";
  const r = it.rollout;
  const rule = [];
  for (const [k, v] of Object.entries((r.rule && r.rule.labels) || {})) rule.push(k + "=" + v);
  if (r.rule && r.rule.percentage !== undefined && r.rule.percentage !== null) rule.push(r.rule.percentage + "%");
  return "v" + r.candidate + " rolling out over v" + r.base + (rule.length ? " to " + rule.join(", ") : "");
}

function renderConfig(data) {
  const panel = document.getElementById("config");
  const items = [];
  for (const ns of data.namespaces) for (const it of ns.items) items.push(it);
  const rows = items.map((it) => {
    const id = itemId(it);
    return h("tr", {
        class: "selectable" + (id === config.selected ? " selected" : ""),
        "data-item": id, "data-current": it.current_version, "data-latest": it.latest_version,
        onclick: () => selectItem(id),
      },
      h("td", { text: id }),
      h("td", { text: it.format }),
      h("td", { class: "num current", text: it.current_version }),
      h("td", { class: "num latest", text: it.latest_version }),
      h("td", { class: "rollout", text: rolloutText(it) || (it.deleted ? "deleted" : "") }),
      h("td", { text: when(it.updated_at_ms) }),
    );
  });
  setBody(panel, items.length
    ? table(["item", "format", { class: "num", text: "current" }, { class: "num", text: "latest" }, "rollout", "updated"], rows)
    : h("div", { class: "muted", text: "no items in " + data.namespaces.map((n) => n.namespace).join(", ") }));
  const table_ = panel.querySelector(".body table");
  if (table_) table_.id = "config-items";

  if (!config.selected && items.length) config.selected = itemId(items[0]);
  const sel = items.find((it) => itemId(it) === config.selected);
  if (sel) {
    const mark = sel.current_version + "/" + sel.latest_version;
    if (mark !== config.seen) {
      config.seen = mark;
      loadDetail(sel);
    }
  } else {
    document.getElementById("config-detail").hidden = true;
  }
}

function selectItem(id) {
  if (id === config.selected) return;
  config.selected = id;
  config.seen = null;
  config.auto = true;
  for (const tr of document.querySelectorAll("#config-items tr[data-item]")) {
    tr.classList.toggle("selected", tr.dataset.item === id);
  }
  poll();
}

function itemQuery(it) {
  const p = new URLSearchParams({ namespace: it.item.namespace, group: it.item.group, key: it.item.key });
  return p.toString();
}

async function loadDetail(it) {
  const detail = document.getElementById("config-detail");
  const err = document.getElementById("config-detail-error");
  detail.hidden = false;
  document.getElementById("config-title").textContent = itemId(it);
  try {
    const hist = await getJson("config/history?" + itemQuery(it));
    config.history = hist.versions || [];
    err.hidden = true;
    renderHistory(it);
    const numbers = config.history.map((v) => v.number);
    const from = document.getElementById("diff-from");
    const to = document.getElementById("diff-to");
    let pickFrom = Number(from.value), pickTo = Number(to.value);
    if (config.auto || !numbers.includes(pickFrom) || !numbers.includes(pickTo)) {
      pickTo = it.current_version || numbers[0];
      pickFrom = numbers.find((n) => n < pickTo) ?? pickTo;
      config.auto = true;
    }
    for (const [sel, pick] of [[from, pickFrom], [to, pickTo]]) {
      sel.replaceChildren(...numbers.map((n) => h("option", { value: n, text: "v" + n, selected: n === pick })));
      sel.value = String(pick);
    }
    await loadDiff(it);
  } catch (e) {
    config.seen = null; // try again at the next poll
    err.textContent = e.message;
    err.hidden = false;
  }
}

function renderHistory(it) {
  const rows = config.history.map((v) => h("tr", { "data-version": v.number },
    h("td", {}, "v" + v.number,
      v.number === it.current_version ? [" ", badge("current", "healthy")] : null,
      v.candidate ? [" ", badge("candidate", "rollout")] : null,
      v.rollback_of ? h("span", { class: "muted", text: " (rollback of v" + v.rollback_of + ")" }) : null),
    h("td", { text: v.author || "" }),
    h("td", { text: v.message || "" }),
    h("td", { text: when(v.created_at_ms) }),
    h("td", { class: "num", text: bytes(v.size) }),
  ));
  const t = table(["version", "author", "message", "published", { class: "num", text: "size" }], rows);
  t.id = "config-history-table";
  document.getElementById("config-history").replaceChildren(t);
}

async function loadDiff(it) {
  const from = document.getElementById("diff-from").value;
  const to = document.getElementById("diff-to").value;
  const target = document.getElementById("config-diff");
  const changes = document.getElementById("config-changes");
  if (!from || !to) { target.replaceChildren(); changes.replaceChildren(); return; }
  const diff = await getJson("config/diff?" + itemQuery(it) + "&from=" + from + "&to=" + to);
  target.replaceChildren(sideBySide(diff));
  changes.replaceChildren(...(diff.structured && diff.changes && diff.changes.length
    ? [h("h4", { text: "Changed keys" }), table(["key", "change", "old", "new"], diff.changes.map((c) =>
        h("tr", { "data-key": c.path },
          h("td", { class: "mono", text: c.path }), h("td", { text: c.op }),
          h("td", { class: "mono", text: c.old_value }), h("td", { class: "mono", text: c.new_value }))))]
    : []));
}

// config-svc's line diff as two columns: equal lines side by side, a run of deletions paired
// row by row with the insertions that follow it, unpaired lines opposite an empty cell.
function sideBySide(diff) {
  const rows = [];
  const lines = diff.lines || [];
  const cells = (l, side) => l
    ? [h("td", { class: "ln", text: side === "old" ? l.old_line : l.new_line }),
       h("td", { class: l.op === "equal" ? "" : (l.op === "delete" ? "del" : "ins"), text: l.text })]
    : [h("td", { class: "ln empty" }), h("td", { class: "empty" })];
  let i = 0;
  while (i < lines.length) {
    if (lines[i].op === "equal") {
      rows.push(h("tr", { class: "diff-row" }, cells(lines[i], "old"), cells(lines[i], "new")));
      i++;
      continue;
    }
    const dels = [], ins = [];
    while (i < lines.length && lines[i].op === "delete") dels.push(lines[i++]);
    while (i < lines.length && lines[i].op === "insert") ins.push(lines[i++]);
    for (let k = 0; k < Math.max(dels.length, ins.length); k++) {
      rows.push(h("tr", { class: "diff-row" }, cells(dels[k], "old"), cells(ins[k], "new")));
    }
  }
  const t = h("table", { class: "diff", id: "config-diff-table",
      "data-from": diff.from_version, "data-to": diff.to_version },
    h("colgroup", {}, h("col", { style: "width:3em" }), h("col", {}), h("col", { style: "width:3em" }), h("col", {})),
    h("thead", {}, h("tr", {}, h("th", {}), h("th", { text: "v" + diff.from_version }),
      h("th", {}), h("th", { text: "v" + diff.to_version }))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 4, class: "muted", text: "identical" }))));
  return t;
}

for (const id of ["diff-from", "diff-to"]) {
  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById(id).addEventListener("change", () => {
      config.auto = false;
      const tr = document.querySelector("#config-items tr.selected");
      if (!tr) return;
      const [namespace, group, key] = tr.dataset.item.split("/");
      loadDiff({ item: { namespace, group, key } }).catch((e) => {
        const err = document.getElementById("config-detail-error");
        err.textContent = e.message;
        err.hidden = false;
      });
    });
  });
}

// ---- routes -------------------------------------------------------------------------------

const lastRequests = new Map(); // "route|backend" -> [requests, time]

function ringSvg(route) {
  const size = 200, c = size / 2, r = 76, width = 26;
  const svg = s("svg", { viewBox: "0 0 " + size + " " + size, width: size, height: size, class: "ring" });
  svg.append(s("circle", { cx: c, cy: c, r, fill: "none", stroke: "#eaeef2", "stroke-width": width }));
  const owners = route.ring || [];
  const n = owners.length;
  const point = (k) => {
    const a = (k / n) * 2 * Math.PI - Math.PI / 2;
    return [c + r * Math.cos(a), c + r * Math.sin(a)];
  };
  let start = 0;
  for (let k = 1; k <= n; k++) {
    if (k < n && owners[k] === owners[start]) continue;
    const owner = owners[start];
    if (owner >= 0 && route.backends[owner]) {
      const colourOf = colour(owner);
      if (start === 0 && k === n) {
        svg.append(s("circle", { cx: c, cy: c, r, fill: "none", stroke: colourOf, "stroke-width": width,
          "data-owner": route.backends[owner].id }));
      } else {
        const [x0, y0] = point(start), [x1, y1] = point(k);
        const large = (k - start) / n > 0.5 ? 1 : 0;
        svg.append(s("path", {
          d: "M " + x0.toFixed(2) + " " + y0.toFixed(2) + " A " + r + " " + r + " 0 " + large + " 1 " +
            x1.toFixed(2) + " " + y1.toFixed(2),
          fill: "none", stroke: colourOf, "stroke-width": width, "data-owner": route.backends[owner].id,
        }));
      }
    }
    start = k;
  }
  const label = s("text", { x: c, y: c - 4, "text-anchor": "middle" });
  label.textContent = route.backends.length + " backend(s)";
  const load = s("text", { x: c, y: c + 14, "text-anchor": "middle" });
  load.textContent = route.in_flight + " in flight";
  svg.append(label, load);
  return svg;
}

function renderRoutes(data) {
  const panel = document.getElementById("routes");
  const now = performance.now();
  setSummary(panel, data.routes.length + " route(s) from " + data.source);
  const blocks = data.routes.map((route) => {
    const maxLoad = Math.max(1, ...route.backends.map((b) => b.in_flight));
    const rows = route.backends.map((b, index) => {
      const key = route.route + "|" + b.id;
      const prev = lastRequests.get(key);
      let rate = "";
      if (prev && now > prev[1]) rate = (Math.max(0, b.requests - prev[0]) * 1000 / (now - prev[1])).toFixed(1);
      lastRequests.set(key, [b.requests, now]);
      return h("tr", { "data-backend": b.id, "data-in-flight": b.in_flight },
        h("td", { class: "nowrap" }, h("span", { class: "swatch", style: "background:" + colour(index) }), b.id),
        h("td", { text: b.instance_id }),
        h("td", { class: "num", text: b.weight }),
        h("td", { class: "num share", text: (b.share * 100).toFixed(1) + "%" }),
        h("td", { class: "num in-flight", text: b.in_flight }),
        h("td", {}, h("div", { class: "bar" }, h("div", { style: "width:" + (100 * b.in_flight / maxLoad) + "%" }))),
        h("td", { class: "num", text: b.requests }),
        h("td", { class: "num", text: rate }),
        h("td", {}, badge(b.registry_health), b.ejected ? [" ", badge("ejected")] : null),
      );
    });
    const sync = route.registry || {};
    const state = sync.connected ? "watching the registry" : ("registry watch down" + (sync.last_error ? ": " + sync.last_error : ""));
    return h("div", { class: "route", "data-route": route.route },
      h("h3", {}, route.route + " → " + route.service + " ",
        h("span", { class: "muted", text: route.algorithm + ", hash on " + route.hash_on +
          "; registry revision " + route.revision + "; " + state +
          (route.panic_mode ? "; PANIC MODE (no healthy instance, using all)" : "") +
          (route.draining.length ? "; draining: " + route.draining.map((d) => d.id).join(", ") : "") })),
      ringSvg(route),
      route.backends.length
        ? table(["backend", "instance", { class: "num", text: "weight" }, { class: "num", text: "keys" },
            { class: "num", text: "in flight" }, "load", { class: "num", text: "requests" },
            { class: "num", text: "req/s" }, "health"], rows)
        : h("div", { class: "muted", text: "no backends" }));
  });
  setBody(panel, ...(blocks.length ? blocks : [h("div", { class: "muted", text: "no routes" })]));
}

// ---- polling ------------------------------------------------------------------------------

const panels = [
  ["cluster", "cluster", renderCluster],
  ["services", "services", renderServices],
  ["config", "config", renderConfig],
  ["routes", "routes", renderRoutes],
];

let polling = false;
async function poll() {
  if (polling) return;
  polling = true;
  try {
    await Promise.all(panels.map(async ([id, path, render]) => {
      const panel = document.getElementById(id);
      try {
        const data = await getJson(path);
        render(data);
        showError(panel, null);
      } catch (e) {
        showError(panel, e);
      }
    }));
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } finally {
    polling = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  poll();
  setInterval(poll, POLL_MS);
});
