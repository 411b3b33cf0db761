// The dtucenter web console: plain DOM, no build step. Every value shown comes from the JSON API (docs/api.md)
// with the session cookie; live changes come from GET /api/events (Server-Sent Events). docs/console.md.
"use strict";

// -- talking to the API ---------------------------------------------------------------------------------------

const session = {account: null, admin: false, csrf: null};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = {};
  if (method !== "GET") headers["X-CSRF-Token"] = session.csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, "the center cannot be reached (" + e.message + ")");
  }
  if (response.status === 401) {
    window.location.replace("/"); // the session ended: the center answers the sign-in page
    throw new ApiError(401, "signed out");
  }
  let answer = null;
  try {
    answer = await response.json();
  } catch (e) {
    throw new ApiError(response.status, `the center answered ${response.status} ${response.statusText}`);
  }
  if (!response.ok) throw new ApiError(response.status, answer.error || response.statusText);
  return answer;
}

const get = (path) => api("GET", path);
const enc = encodeURIComponent;

// -- building the page ----------------------------------------------------------------------------------------

// h("tag.class#id", {attr: value, onclick: fn}, child, ...): children are nodes or text, never parsed as HTML.
function h(spec, props, ...children) {
  const [, tag, rest] = spec.match(/^([a-z0-9]+)(.*)$/);
  const el = document.createElement(tag);
  for (const part of rest.match(/[.#][^.#]+/g) || []) {
    if (part[0] === ".") el.classList.add(part.slice(1));
    else el.id = part.slice(1);
  }
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

// A time in the browser's zone, with UTC on hover.
function when(iso) {
  if (!iso) return h("span.muted", {}, "never");
  const date = new Date(iso);
  return h("time", {datetime: date.toISOString(), title: "UTC " + date.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z")},
    date.toLocaleString());
}

function notice(message, kind = "error") {
  const box = document.getElementById("notices");
  const item = h("div.notice." + kind, {}, h("span", {}, message),
    h("button", {type: "button", "aria-label": "Dismiss", onclick: () => item.remove()}, "×"));
  box.append(item);
  if (kind !== "error") setTimeout(() => item.remove(), 5000);
  while (box.children.length > 5) box.firstChild.remove();
}

// Runs an action of a button or form: the button is disabled meanwhile, the answer or the error is shown.
async function act(button, output, action) {
  if (button) button.disabled = true;
  if (output) {
    output.textContent = "…";
    output.classList.remove("error");
  }
  try {
    const answer = await action();
    if (output && answer !== undefined) output.textContent = typeof answer === "string" ? answer : JSON.stringify(answer);
    return answer;
  } catch (e) {
    if (output) {
      output.textContent = "Error: " + e.message;
      output.classList.add("error");
    } else {
      notice(e.message);
    }
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

function field(label, input) {
  const id = input.id || "f-" + Math.random().toString(36).slice(2);
  input.id = id;
  return h("div.field", {}, h("label", {for: id}, label), input);
}

function table(headings, rows, caption) {
  return h("div.scroll", {}, h("table", {},
    caption ? h("caption", {}, caption) : null,
    h("thead", {}, h("tr", {}, headings.map((t) => h("th", {scope: "col"}, t)))),
    h("tbody", {}, rows)));
}

function dot(online) {
  return h("span.dot." + (online ? "on" : online === false ? "off" : "unknown"), {},
    online ? "online" : online === false ? "offline" : "unknown");
}

// -- live updates ---------------------------------------------------------------------------------------------

// The status events seen since the console opened (and those the center replays to a new stream), newest last,
// so the overview's "recent events" survive moving between pages; at most RECENT_KEPT, by event id.
const RECENT_KEPT = 100;
const STATUS_EVENTS = ["dtu_online", "dtu_offline", "link_up", "link_down", "meter_failed", "alarm_raised",
                       "alarm_cleared"];
const live = {source: null, watch: "", handlers: {}, recent: [], seen: new Set(), summary: null};

function remember(id, name, data) {
  if (!id || live.seen.has(id)) return false;
  live.seen.add(id);
  live.recent.push({id, name, data});
  while (live.recent.length > RECENT_KEPT) live.seen.delete(live.recent.shift().id);
  return true;
}

// One stream at a time: the page says what it watches and what it does with each kind of event.
function listen(watch, handlers) {
  live.handlers = handlers;
  if (live.source && live.watch === watch) return;
  if (live.source) live.source.close();
  live.watch = watch;
  const url = "/api/events" + (watch ? "?watch=" + enc(watch) : "");
  const source = new EventSource(url, {withCredentials: true});
  live.source = source;
  const status = document.getElementById("live");
  source.onopen = () => { status.textContent = "live"; status.className = "live on"; };
  source.onerror = () => {
    status.textContent = "reconnecting…"; status.className = "live off";
    // A stream refused (signed out) is not retried by the browser: find out why.
    if (source.readyState === EventSource.CLOSED) get("/api/session").then(() => listen(watch, live.handlers), () => {});
  };
  for (const name of ["summary", "upload", "meter_read", "resync", "hello", ...STATUS_EVENTS]) {
    source.addEventListener(name, (event) => {
      const handler = live.handlers[name] || live.handlers["*"];
      if (name === "resync") {
        render(); // what it shows may have changed while the stream was away
        return;
      }
      const data = JSON.parse(event.data);
      if (name === "summary") live.summary = data; // shown at once by the next overview, not 5 s later
      // A status event replayed to a new stream was shown already: once is enough.
      if (STATUS_EVENTS.includes(name) && !remember(event.lastEventId, name, data)) return;
      if (handler) handler(data, name);
    });
  }
}

function describeEvent(name, data) {
  switch (name) {
    case "dtu_online": return [`DTU ${data.psn} came online`, `from ${data.peer}`];
    case "dtu_offline": return [`DTU ${data.psn} went offline`, `was ${data.peer}`];
    case "link_up": return [`Link ${data.link} up`, `from ${data.remote}`];
    case "link_down": return [`Link ${data.link} down`, ""];
    case "meter_failed": return [`Meter ${data.meter} failed a poll`, data.reason];
    case "alarm_raised": return [`Alarm: ${data.rule} on ${data.device_kind} ${data.device}`, data.message];
    case "alarm_cleared": return [`Alarm cleared: ${data.rule} on ${data.device_kind} ${data.device}`, data.message];
    default: return [name, ""];
  }
}

// -- pages ----------------------------------------------------------------------------------------------------

const main = () => document.getElementById("main");
let renderCount = 0;

function page(title, ...children) {
  document.title = title + " · dtucenter";
  const el = main();
  el.replaceChildren(h("h1", {}, title), ...children);
}

async function render() {
  const number = ++renderCount;
  const hash = window.location.hash.replace(/^#\/?/, "") || "overview";
  const [name, ...rest] = hash.split("/");
  const arg = rest.length ? decodeURIComponent(rest.join("/")) : null;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const pages = {overview, dtus: arg ? dtuPage : dtuList, meters: arg ? meterPage : meterList, links: linkList,
                 discovery};
  const show = pages[name] || notFound;
  try {
    await show(arg, () => number === renderCount);
  } catch (e) {
    if (number !== renderCount) return;
    page("Something went wrong", h("p.error", {role: "alert"}, e.message),
      h("p", {}, h("a", {href: "#/overview"}, "Back to the overview")));
  }
}

function notFound() {
  page("Not found", h("p", {}, "There is no such page. "), h("a", {href: "#/overview"}, "Overview"));
}

// -- overview -------------------------------------------------------------------------------------------------

async function overview(_, current) {
  const cards = {};
  const card = (key, label) => {
    cards[key] = h("span.value", {}, "…");
    return h("div.card", {dataset: {card: key}}, h("span.label", {}, label), cards[key]);
  };
  const events = h("ol.events", {"aria-live": "polite", "aria-label": "Recent events"});
  const pending = h("span.value", {}, "…");
  page("Overview",
    h("section.cards", {"aria-label": "Fleet"},
      card("dtus", "DTUs online"), card("meters", "Meters polling"), card("failing", "Meters failing"),
      card("links", "Links up"), card("uploads", "Uploads / s"), card("reads", "Meter reads / s"),
      card("store", "Store"),
      h("div.card", {dataset: {card: "pending"}}, h("span.label", {}, "Pending devices"), pending)),
    h("h2", {}, "Recent events"), events);
  const addEvent = (data, name) => {
    const [title, detail] = describeEvent(name, data);
    events.prepend(h("li.event." + name, {}, when(data.time), " ", h("strong", {}, title), " ", h("span.muted", {}, detail)));
    while (events.children.length > RECENT_KEPT) events.lastChild.remove();
  };
  for (const {name, data} of live.recent) addEvent(data, name);
  const showSummary = (s) => {
      cards.dtus.textContent = `${s.dtus_online} / ${s.dtus_total}`;
      cards.meters.textContent = `${s.meters - s.meters_failing} / ${s.meters}`;
      cards.failing.textContent = String(s.meters_failing);
      cards.failing.parentElement.classList.toggle("bad", s.meters_failing > 0);
      cards.links.textContent = `${s.links_up} / ${s.links}`;
      cards.uploads.textContent = s.uploads_per_s === null ? "…" : String(s.uploads_per_s);
      cards.reads.textContent = s.reads_per_s === null ? "…" : String(s.reads_per_s);
      cards.store.replaceChildren(s.store.healthy ? "healthy" : "NOT healthy",
        s.store.backlog_rows === undefined ? "" : h("span.detail", {}, `${s.store.backlog_rows} rows queued`));
      cards.store.parentElement.classList.toggle("bad", !s.store.healthy);
      // An admin's summary counts the pending devices, so the card stays live; others keep the count read below.
      if (s.pending !== undefined) pending.replaceChildren(h("a", {href: "#/discovery"}, String(s.pending)));
  };
  if (live.summary) showSummary(live.summary);
  listen("", {
    summary: showSummary,
    ...Object.fromEntries(STATUS_EVENTS.map((name) => [name, addEvent])),
  });
  try {
    const found = await get("/api/pending");
    if (current()) pending.replaceChildren(h("a", {href: "#/discovery"}, String(found.pending.length)));
  } catch (e) {
    pending.textContent = e.status === 404 ? "not available on this center" : "error";
    pending.classList.add("text");
    pending.title = e.message;
  }
}

// -- DTUs -----------------------------------------------------------------------------------------------------

const dtuListState = {q: "", sort: "psn", order: "asc", offset: 0, limit: 50};

async function dtuList(_, current) {
  const st = dtuListState;
  const search = h("input", {type: "search", value: st.q, placeholder: "PSN, name or CCID"});
  const sort = h("select", {}, [["psn", "PSN"], ["name", "Name"], ["online", "Online"], ["last_seen", "Last seen"],
                                ["last_login", "Last login"]].map(([v, t]) => h("option", {value: v, selected: v === st.sort}, t)));
  const order = h("select", {}, [["asc", "ascending"], ["desc", "descending"]].map(
    ([v, t]) => h("option", {value: v, selected: v === st.order}, t)));
  const body = h("tbody");
  const info = h("p.muted", {"aria-live": "polite"});
  const prev = h("button", {type: "button"}, "Previous page");
  const next = h("button", {type: "button"}, "Next page");
  const rows = new Map();
  const load = async () => {
    const params = new URLSearchParams({q: st.q, sort: st.sort, order: st.order, offset: st.offset, limit: st.limit});
    const found = await get("/api/dtus?" + params);
    if (!current()) return;
    rows.clear();
    body.replaceChildren(...found.dtus.map((d) => {
      const state = h("td", {}, dot(d.online));
      rows.set(d.psn, state);
      return h("tr", {}, h("td", {}, h("a", {href: "#/dtus/" + d.psn}, String(d.psn))), h("td", {}, d.name),
        state, h("td", {}, d.remote || ""), h("td", {}, when(d.last_seen)), h("td", {}, d.account));
    }));
    const last = Math.min(st.offset + st.limit, found.total);
    info.textContent = found.total ? `DTUs ${st.offset + 1}–${last} of ${found.total}` : "No DTU matches.";
    prev.disabled = st.offset === 0;
    next.disabled = last >= found.total;
  };
  let typing = null;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { st.q = search.value.trim(); st.offset = 0; act(null, null, load); }, 250);
  });
  sort.addEventListener("change", () => { st.sort = sort.value; st.offset = 0; act(null, null, load); });
  order.addEventListener("change", () => { st.order = order.value; st.offset = 0; act(null, null, load); });
  prev.addEventListener("click", () => { st.offset = Math.max(0, st.offset - st.limit); act(prev, null, load); });
  next.addEventListener("click", () => { st.offset += st.limit; act(next, null, load); });
  page("DTUs",
    h("form.toolbar", {role: "search", onsubmit: (e) => e.preventDefault()},
      field("Search", search), field("Sort by", sort), field("Order", order)),
    info,
    h("div.scroll", {}, h("table", {}, h("thead", {}, h("tr", {},
      ["PSN", "Name", "State", "Address", "Last seen", "Account"].map((t) => h("th", {scope: "col"}, t)))), body)),
    h("div.pager", {}, prev, next));
  const mark = (online) => (d) => {
    const cell = rows.get(d.psn);
    if (cell) cell.replaceChildren(dot(online));
  };
  listen("", {dtu_online: mark(true), dtu_offline: mark(false)});
  await load();
}

const RANGES = [["300", "Last 5 minutes"], ["900", "Last 15 minutes"], ["3600", "Last hour"], ["21600", "Last 6 hours"], ["86400", "Last 24 hours"],
                ["604800", "Last 7 days"], ["2592000", "Last 30 days"]];
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

// A chart of a /chart answer: the mean of each series per bucket, min and max as faint lines for one series.
function chartView(load, label, exportUrl) {
  const range = h("select", {}, RANGES.map(([v, t]) => h("option", {value: v, selected: v === "3600"}, t)));
  const box = h("div.chart", {"aria-label": "Chart", role: "img"});
  const caption = h("p.muted.chart-caption", {"aria-live": "polite"});
  const download = h("a.button", {href: "#", download: ""}, "Export CSV");
  let plot = null;
  let refreshing = null;
  const draw = async () => {
    const seconds = Number(range.value);
    const until = new Date();
    const since = new Date(until.getTime() - seconds * 1000);
    const points = Math.max(100, Math.min(4000, Math.floor(box.clientWidth || 800)));
    const query = new URLSearchParams({since: since.toISOString(), until: until.toISOString(), points});
    const data = await load(query);
    download.href = exportUrl(new URLSearchParams({since: since.toISOString(), until: until.toISOString()}));
    const series = data.series.map(label);
    const columns = [data.time, ...data.mean];
    const opts = {
      width: box.clientWidth || 800, height: 280,
      scales: {x: {time: true, min: since.getTime() / 1000, max: until.getTime() / 1000}},
      series: [{label: "time", value: (u, v) => v === null ? "" : new Date(v * 1000).toLocaleString()},
               ...series.map((s, i) => ({label: s, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false}))],
      axes: [{}, {size: 60}],
    };
    if (data.mean.length === 1) {
      columns.push(data.min[0], data.max[0]);
      opts.series.push({label: "min", stroke: "#9ab", width: 1, dash: [4, 4]}, {label: "max", stroke: "#9ab", width: 1, dash: [4, 4]});
    }
    if (plot) plot.destroy();
    box.replaceChildren();
    plot = new uPlot(opts, columns, box);
    box.dataset.samples = data.samples;
    box.dataset.points = data.time.length;
    const bucket = data.bucket_s >= 1 ? `${Math.round(data.bucket_s)} s` : `${data.bucket_s.toFixed(2)} s`;
    caption.textContent = data.samples
      ? `${data.samples} samples in range, drawn as ${data.time.length} points (min/max/mean per ${bucket}); ${data.gaps} gap${data.gaps === 1 ? "" : "s"}.`
      : "No samples in this range.";
  };
  range.addEventListener("change", () => act(null, caption, draw));
  const onResize = () => { if (plot && box.isConnected) plot.setSize({width: box.clientWidth, height: 280}); };
  window.addEventListener("resize", onResize);
  return {
    view: h("section.chart-section", {}, h("div.toolbar", {}, field("Range", range), download), box, caption),
    draw: () => act(null, caption, draw),
    // New values arrived: redraw once a few seconds later, not once per value.
    changed: () => {
      if (refreshing) return;
      refreshing = setTimeout(() => { refreshing = null; if (box.isConnected) act(null, null, draw); }, 3000);
    },
  };
}

function registersFrom(text, withValue) {
  const registers = [];
  for (const line of text.split(/[\n;]+/).map((l) => l.trim()).filter(Boolean)) {
    const parts = line.split(/[\s,:=]+/).map(Number);
    if (parts.length !== (withValue ? 3 : 2) || parts.some((n) => !Number.isInteger(n))) {
      throw new Error(`"${line}" is not ${withValue ? "dev, addr, value" : "dev, addr"}`);
    }
    registers.push(withValue ? {dev: parts[0], addr: parts[1], value: parts[2]} : {dev: parts[0], addr: parts[1]});
  }
  return registers;
}

async function dtuPage(psnText, current) {
  const psn = Number(psnText);
  const base = "/api/dtus/" + psn;
  const [dtu, setup] = await Promise.all([get(base), get(base + "/setup")]);
  if (!current()) return;
  const state = h("span", {}, dot(dtu.online));
  const seen = h("span", {}, when(dtu.last_seen));
  const latest = h("div");
  const trail = h("div");
  const edits = h("div");
  const places = (setup.registers || []).map((r) => `dev ${r.dev} addr ${r.addr}`);

  const showLatest = (samples) => {
    latest.replaceChildren(samples.length ? table(["Position", "Register", "Value", "Time"], samples.map((s) =>
      h("tr", {}, h("td", {}, String(s.position)), h("td", {}, s.dev === null ? "" : `dev ${s.dev} addr ${s.addr}`),
        h("td.num", {}, String(s.value)), h("td", {}, when(s.time))))) : h("p.muted", {}, "No upload stored yet."));
  };
  const loadTrail = async () => {
    const [commands, changes] = await Promise.all([get(base + "/commands?limit=20"), get(base + "/edits?limit=20")]);
    trail.replaceChildren(commands.commands.length ? table(["Queued", "Command", "Request", "Outcome", "Result", "Who"],
      commands.commands.map((c) => h("tr", {}, h("td", {}, when(c.queued)), h("td", {}, c.kind),
        h("td.code", {}, JSON.stringify(c.request)), h("td", {}, c.outcome),
        h("td.code", {}, c.error || (c.result === null ? "" : JSON.stringify(c.result))), h("td", {}, c.who)))) :
      h("p.muted", {}, "No command sent yet."));
    edits.replaceChildren(changes.edits.length ? table(["Time", "Change", "Fields", "Who"], changes.edits.map((e) =>
      h("tr", {}, h("td", {}, when(e.time)), h("td", {}, e.action), h("td.code", {}, JSON.stringify(e.fields)),
        h("td", {}, e.who)))) : h("p.muted", {}, "No change through the API yet."));
  };

  // Login parameters, sent to the DTU at its next login.
  const inputs = {
    name: h("input", {value: dtu.name, maxlength: 100}),
    tick_time: h("input", {type: "number", min: 1, max: 255, value: dtu.tick_time}),
    send_test_time: h("input", {type: "number", min: 0, max: 255, value: dtu.send_test_time}),
    fota_flag: h("input", {type: "number", min: 0, max: 255, value: dtu.fota_flag}),
    new_ip: h("input", {value: dtu.new_ip, maxlength: 15, inputmode: "decimal"}),
    new_port: h("input", {type: "number", min: 0, max: 65535, value: dtu.new_port}),
  };
  const saveOut = h("output.answer");
  const save = h("button", {type: "submit"}, "Save");
  const paramsForm = h("form.grid", {onsubmit: (e) => {
    e.preventDefault();
    act(save, saveOut, async () => {
      const body = {name: inputs.name.value};
      for (const key of ["tick_time", "send_test_time", "fota_flag", "new_port"]) body[key] = Number(inputs[key].value);
      body.new_ip = inputs.new_ip.value.trim();
      await api("PUT", base, body);
      loadTrail();
      return "Saved: the DTU gets them at its next login.";
    });
  }}, field("Name", inputs.name), field("TickTime (s)", inputs.tick_time),
     field("SendTestTime (s)", inputs.send_test_time), field("FOTA flag", inputs.fota_flag),
     field("Redirect IP", inputs.new_ip), field("Redirect port", inputs.new_port), h("div.actions", {}, save, saveOut));

  // Commands: each answer under its form, the trail below.
  const command = (title, labelText, placeholder, path, withValue, extra) => {
    const text = h("textarea", {rows: 2, placeholder, spellcheck: "false"});
    const out = h("output.answer", {"aria-live": "polite"});
    const button = h("button", {type: "submit"}, title);
    return h("form.command", {onsubmit: (e) => {
      e.preventDefault();
      act(button, out, async () => {
        const body = {registers: registersFrom(text.value, withValue), ...(extra ? extra() : {})};
        const answer = await api("POST", base + path, body);
        loadTrail();
        return answer;
      });
    }}, h("h3", {}, title), field(labelText, text), button, out);
  };
  const sendTest = h("input", {type: "number", min: 0, max: 255, value: setup.send_test_time});
  const registerText = h("textarea", {rows: 3, spellcheck: "false"});
  registerText.value = (setup.registers || []).map((r) => `${r.dev}, ${r.addr}`).join("\n");
  const setupOut = h("output.answer", {"aria-live": "polite"});
  const push = h("button", {type: "submit"}, "Push register list");
  const readBack = h("button", {type: "button", onclick: () => act(readBack, setupOut, async () => {
    const answer = await get(base + "/setup?live=1");
    registerText.value = answer.registers.map((r) => `${r.dev}, ${r.addr}`).join("\n");
    sendTest.value = answer.send_test_time;
    loadTrail();
    return answer;
  })}, "Read register list from the DTU");
  const setupForm = h("form.command", {onsubmit: (e) => {
    e.preventDefault();
    act(push, setupOut, async () => {
      const answer = await api("POST", base + "/setup", {send_test_time: Number(sendTest.value), registers: registersFrom(registerText.value, false)});
      loadTrail();
      return answer;
    });
  }}, h("h3", {}, "Register list (SaveSetup / ReadSetup)"), field("SendTestTime (s)", sendTest),
     field("Registers, one \"dev, addr\" a line", registerText), h("div.actions", {}, push, readBack), setupOut);

  const chart = chartView((q) => get(base + "/chart?" + q), (s) => s.dev === null ? `#${s.position}` : `#${s.position} (${s.dev}/${s.addr})`,
    (q) => base + "/export?" + q);
  page(`DTU ${psn}` + (dtu.name ? ` · ${dtu.name}` : ""),
    h("dl.facts", {},
      h("dt", {}, "State"), h("dd", {}, state), h("dt", {}, "Address"), h("dd", {}, dtu.remote || "—"),
      h("dt", {}, "Last seen"), h("dd", {}, seen), h("dt", {}, "Last login"), h("dd", {}, when(dtu.last_login)),
      h("dt", {}, "Product"), h("dd", {}, `${dtu.pname || "—"} v${dtu.version}`), h("dt", {}, "CCID"), h("dd", {}, dtu.ccid || "—"),
      h("dt", {}, "Account"), h("dd", {}, dtu.account),
      h("dt", {}, "Register list"), h("dd", {}, places.length ? places.join(", ") : "not set")),
    h("h2", {}, "Latest values"), latest,
    h("h2", {}, "Chart"), chart.view,
    h("h2", {}, "Commands"),
    h("div.commands", {},
      command("ReadTest", "Registers to read, one \"dev, addr\" a line", "1, 0", "/read", false),
      command("SetControl", "Registers to write, one \"dev, addr, value\" a line", "1, 10, 500", "/write", true),
      setupForm),
    h("h2", {}, "Login parameters"), paramsForm,
    h("h2", {}, "Audit trail"), trail, h("h3", {}, "Record changes"), edits);
  listen("dtu:" + psn, {
    dtu_online: (d) => { if (d.psn === psn) state.replaceChildren(dot(true)); },
    dtu_offline: (d) => { if (d.psn === psn) state.replaceChildren(dot(false)); },
    upload: (d) => {
      if (d.psn !== psn) return;
      seen.replaceChildren(when(d.time));
      showLatest(d.values.map((value, position) => {
        const r = (setup.registers || [])[position];
        return {position, value, time: d.time, dev: r ? r.dev : null, addr: r ? r.addr : null};
      }));
      chart.changed();
    },
  });
  showLatest((await get(base + "/latest")).samples);
  await Promise.all([chart.draw(), loadTrail()]);
}

// -- meters ---------------------------------------------------------------------------------------------------

async function meterList(_, current) {
  const found = await get("/api/meters");
  if (!current()) return;
  const search = h("input", {type: "search", placeholder: "Name or link"});
  const rows = found.meters.map((m) => ({m, row: h("tr", {}, h("td", {}, h("a", {href: "#/meters/" + enc(m.name)}, m.name)),
    h("td", {}, m.link), h("td", {}, String(m.unit)), h("td", {}, `${m.interval} s`),
    h("td", {}, m.failing ? h("span.bad", {}, "failing") : "ok"), h("td", {}, dot(m.link_online)),
    h("td", {}, when(m.last_success)), h("td", {}, m.account))}));
  const body = h("tbody", {}, rows.map((r) => r.row));
  search.addEventListener("input", () => {
    const q = search.value.trim().toLowerCase();
    body.replaceChildren(...rows.filter((r) => !q || r.m.name.toLowerCase().includes(q) || r.m.link.toLowerCase().includes(q)).map((r) => r.row));
  });
  page("Meters", h("form.toolbar", {role: "search", onsubmit: (e) => e.preventDefault()}, field("Filter", search)),
    found.meters.length ? h("div.scroll", {}, h("table", {}, h("thead", {}, h("tr", {},
      ["Meter", "Link", "Unit", "Interval", "Polls", "Link state", "Last good poll", "Account"].map((t) => h("th", {scope: "col"}, t)))), body))
      : h("p.muted", {}, "No meters."));
  listen("", {});
}

async function meterPage(name, current) {
  const base = "/api/meters/" + enc(name);
  const meter = await get(base);
  if (!current()) return;
  const points = meter.points.map((p) => p.name);
  const values = new Map();
  const valueRows = meter.points.map((p) => {
    const cell = h("td.num", {dataset: {point: p.name}}, "—");
    const at = h("td");
    values.set(p.name, {cell, at});
    return h("tr", {}, h("th", {scope: "row"}, p.name), cell, h("td", {}, p.unit || ""), at,
      h("td", {}, `${p.table} ${p.address}${p.type ? " " + p.type : ""}`));
  });
  const show = (point, value, time) => {
    const slot = values.get(point);
    if (!slot) return;
    slot.cell.textContent = value === null ? "NaN" : String(value);
    slot.at.replaceChildren(when(time));
  };
  const failures = h("div");
  const writes = h("div");
  let trailsDue = null;
  const loadTrails = async () => {
    const [f, w] = await Promise.all([get(base + "/failures?limit=20"), get(base + "/writes?limit=20")]);
    failures.replaceChildren(f.failures.length ? table(["First", "Last", "Polls", "Reason"], f.failures.map((s) =>
      h("tr", {}, h("td", {}, when(s.first)), h("td", {}, when(s.last)), h("td.num", {}, String(s.count)), h("td", {}, s.reason))))
      : h("p.muted", {}, "No failed poll."));
    writes.replaceChildren(w.writes.length ? table(["Requested", "Point", "Value", "Outcome", "Who"], w.writes.map((x) =>
      h("tr", {}, h("td", {}, when(x.requested)), h("td", {}, x.point), h("td.num", {}, String(x.value)),
        h("td", {}, x.outcome + (x.error ? ": " + x.error : "")), h("td", {}, x.who))))
      : h("p.muted", {}, "No write yet."));
  };
  const writable = meter.points.filter((p) => p.table === "holding" || p.table === "coil");
  const point = h("select", {}, writable.map((p) => h("option", {value: p.name}, p.name)));
  const value = h("input", {type: "text", inputmode: "decimal", required: true});
  const out = h("output.answer", {"aria-live": "polite"});
  const write = h("button", {type: "submit"}, "Write");
  const writeForm = h("form.command", {onsubmit: (e) => {
    e.preventDefault();
    act(write, out, async () => {
      const text = value.value.trim();
      const typed = text === "true" ? true : text === "false" ? false : Number(text);
      if (typeof typed === "number" && Number.isNaN(typed)) throw new Error(`"${text}" is not a number`);
      const answer = await api("POST", base + "/write", {point: point.value, value: typed});
      loadTrails();
      return answer;
    });
  }}, h("h3", {}, "Write a point"), field("Point", point), field("Value", value), write, out);
  const readOut = h("output.answer", {"aria-live": "polite"});
  const readNow = h("button", {type: "button", onclick: () => act(readNow, readOut, async () => {
    const answer = await api("POST", base + "/read", {});
    for (const [p, v] of Object.entries(answer.values || {})) show(p, v, answer.time);
    return answer;
  })}, "Read now");
  const which = h("select", {}, points.map((p, i) => h("option", {value: p, selected: i === 0}, p)));
  const chart = chartView((q) => { q.set("point", which.value); return get(base + "/chart?" + q); }, (s) => s.point,
    (q) => { q.set("point", which.value); return base + "/export?" + q; });
  which.addEventListener("change", () => chart.draw());
  page(`Meter ${name}`,
    h("dl.facts", {},
      h("dt", {}, "Link"), h("dd", {}, `${meter.link} `, dot(meter.link_online), meter.link_remote ? ` ${meter.link_remote}` : ""),
      h("dt", {}, "Unit"), h("dd", {}, String(meter.unit)), h("dt", {}, "Interval"), h("dd", {}, `${meter.interval} s`),
      h("dt", {}, "Polls"), h("dd", {}, meter.failing ? h("span.bad", {}, "failing") : "ok", meter.last_error ? ` (last error: ${meter.last_error})` : ""),
      h("dt", {}, "Next poll"), h("dd", {}, when(meter.next_poll)), h("dt", {}, "Account"), h("dd", {}, meter.account)),
    h("h2", {}, "Points"), table(["Point", "Value", "Unit", "Read", "Register"], valueRows), h("p", {}, readNow, " ", readOut),
    h("h2", {}, "Chart"), field("Point", which), chart.view,
    writable.length ? writeForm : h("p.muted", {}, "No writable point (holding registers and coils are)."),
    h("h2", {}, "Writes"), writes, h("h2", {}, "Failure history"), failures);
  listen("meter:" + name, {
    meter_read: (d) => {
      if (d.meter !== name) return;
      for (const [p, v] of Object.entries(d.values)) show(p, v, d.time);
      chart.changed();
    },
    meter_failed: (d) => {
      // Failures come in bursts (and replayed): the trail is read again once, a moment later.
      if (d.meter !== name || trailsDue) return;
      trailsDue = setTimeout(() => { trailsDue = null; if (current()) act(null, null, loadTrails); }, 2000);
    },
  });
  for (const s of (await get(base + "/latest")).samples) show(s.point, s.value, s.time);
  await Promise.all([chart.draw(), loadTrails()]);
}

// -- links ----------------------------------------------------------------------------------------------------

async function linkList(_, current) {
  const found = await get("/api/links");
  if (!current()) return;
  const cells = new Map();
  const rows = found.links.map((l) => {
    const state = h("td", {}, dot(l.online));
    const remote = h("td", {}, l.remote || "");
    cells.set(l.name, {state, remote});
    const reg = l.definition && (l.definition.registration || l.definition.listen || l.definition.connect || l.definition.serial) || "";
    const counters = l.counters || {};
    const bytes = counters.bytes_in === undefined ? "" : `${counters.bytes_in} in / ${counters.bytes_out} out`;
    return h("tr", {}, h("td", {}, l.name), h("td", {}, l.kind || ""), state, remote, h("td.code", {}, String(reg)),
      h("td", {}, bytes), h("td", {}, (l.meters || []).map((m, i) => [i ? ", " : "", h("a", {href: "#/meters/" + enc(m)}, m)])),
      h("td", {}, when(l.last_disconnect)), h("td", {}, l.account));
  });
  page("Links", found.links.length ? table(["Link", "Kind", "State", "Peer", "Registration / endpoint", "Bytes",
    "Meters", "Last disconnect", "Account"], rows) : h("p.muted", {}, "No links."));
  listen("", {
    link_up: (d) => { const c = cells.get(d.link); if (c) { c.state.replaceChildren(dot(true)); c.remote.textContent = d.remote; } },
    link_down: (d) => { const c = cells.get(d.link); if (c) c.state.replaceChildren(dot(false)); },
  });
}

// -- discovery ------------------------------------------------------------------------------------------------

const discoveryState = {registration: ""};

async function discovery(_, current) {
  // An admin sees every pending device; an account finds its own by the registration it set (docs/api.md).
  const query = discoveryState.registration ? "?registration=" + enc(discoveryState.registration) : "";
  let found;
  try {
    found = await get("/api/pending" + query);
  } catch (e) {
    if (e.status !== 404 || query) throw e;
    page("Discovery", h("p.notice.info", {}, "Discovery of pending devices is not available on this center build."));
    return;
  }
  if (!current()) return;
  const templates = await get("/api/templates").catch(() => ({templates: []}));
  const accounts = session.admin ? (await get("/api/accounts")).accounts.map((a) => a.name) : [];
  const search = h("input", {type: "search", value: discoveryState.registration, placeholder: "IMEI, SN or PSN",
                             spellcheck: "false"});
  const find = h("form.toolbar", {role: "search", onsubmit: (e) => {
    e.preventDefault();
    discoveryState.registration = search.value.trim();
    render();
  }}, field("Registration", search), h("button", {type: "submit"}, "Find"));
  const rows = found.pending.map((p) => {
    const fields = [];
    const account = h("select", {}, accounts.map((a) => h("option", {value: a, selected: a === session.account}, a)));
    if (session.admin) fields.push(field("Account", account));
    const template = h("select", {}, h("option", {value: ""}, "no meter"),
      templates.templates.map((t) => h("option", {value: t.name}, t.name)));
    const unit = h("input", {type: "number", min: 1, max: 247, value: 1});
    const interval = h("input", {type: "number", min: 1, value: 10});
    if (p.kind !== "dtu") fields.push(field("Template", template), field("Unit", unit), field("Interval (s)", interval));
    const out = h("output.answer", {"aria-live": "polite"});
    const adopt = h("button", {type: "submit"}, "Adopt");
    const form = h("form.adopt", {onsubmit: (e) => {
      e.preventDefault();
      act(adopt, out, async () => {
        const body = session.admin ? {account: account.value} : {};
        if (p.kind !== "dtu" && template.value) {
          Object.assign(body, {template: template.value, unit: Number(unit.value), interval: Number(interval.value)});
        }
        const answer = await api("POST", `/api/pending/${enc(p.id)}/adopt`, body);
        adopt.disabled = true;
        return answer;
      });
    }}, ...fields, adopt, out);
    return h("tr", {}, h("td.code", {}, p.registration), h("td", {}, p.kind || ""), h("td", {}, p.peer),
      h("td", {}, when(p.first_seen)), h("td", {}, when(p.last_seen)), h("td.num", {}, String(p.times_seen ?? "")),
      h("td", {}, form));
  });
  const none = session.admin || query ? "No device is waiting for adoption." :
    "Enter the registration your DTU sends (its IMEI, SN or PSN) to find it.";
  page("Discovery", find, found.pending.length ? table(["Registration", "Kind", "Peer", "First seen", "Last seen",
    "Times seen", "Adopt"], rows) : h("p.muted", {}, none));
  listen("", {});
}

// -- start ----------------------------------------------------------------------------------------------------

async function start() {
  try {
    const me = await get("/api/session");
    Object.assign(session, me);
  } catch (e) {
    if (e.status !== 401) page("The center cannot be reached", h("p.error", {role: "alert"}, e.message));
    return;
  }
  document.getElementById("who").textContent = `${session.account}${session.admin ? " (admin)" : ""}`;
  const signout = document.getElementById("signout");
  signout.addEventListener("click", () => act(signout, null, async () => {
    if (live.source) live.source.close();
    await api("DELETE", "/api/session");
    window.location.replace("/");
  }));
  window.addEventListener("hashchange", render);
  await render();
}

document.addEventListener("DOMContentLoaded", start);
