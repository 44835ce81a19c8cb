// The dashboard: sign-in, the trainings table and a live page per training, on the public JSON API.
// Everything a user or client wrote is put into the page as text (textContent), never as HTML.

import { lineChart } from "./charts.js";

const TOKEN_KEY = "fltraining.token";
const USER_KEY = "fltraining.user";
const PAGE_SIZE = 50;
const LIST_REFRESH_MS = 5000;
const RECONNECT_MS = 1000;
const STATE_NAMES = { I: "Initial", O: "Ongoing", C: "Completed", E: "Error", S: "SWAG round" };
const ENDED = new Set(["C", "E"]);

const main = document.getElementById("main");
let live = null; // what the current page runs in the background: {stop()}

// ---------------------------------------------------------------- DOM and API helpers

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function render(...nodes) {
  main.replaceChildren(...nodes);
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function basic(username, password) {
  const bytes = new TextEncoder().encode(`${username}:${password}`);
  return `Basic ${btoa(String.fromCharCode(...bytes))}`;
}

async function api(path, { method = "GET", body, etag, headers = {} } = {}) {
  const sent = { Accept: "application/json", ...headers };
  if (!sent.Authorization && token()) sent.Authorization = `Token ${token()}`;
  if (etag) sent["If-None-Match"] = etag;
  let payload;
  if (body !== undefined) {
    sent["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers: sent, body: payload, cache: "no-store" });
  if (response.status === 304) return { status: 304, etag };
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = (data && typeof data.detail === "string" && data.detail) || `${response.status} ${response.statusText}`;
    if (response.status === 401 && !String(sent.Authorization || "").startsWith("Basic")) forget();
    throw new ApiError(response.status, message);
  }
  return { status: response.status, data, etag: response.headers.get("ETag"), total: response.headers.get("X-Total-Count") };
}

function forget() {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(USER_KEY);
}

function me() {
  try {
    return JSON.parse(sessionStorage.getItem(USER_KEY) || "null");
  } catch {
    return null;
  }
}

function displayName(user) {
  if (!user) return "unknown user";
  const full = [user.first_name, user.last_name].filter(Boolean).join(" ");
  return full ? `${full} (${user.username})` : user.username;
}

function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

function time(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleTimeString();
}

function bytes(size) {
  if (size < 1024) return `${size} B`;
  const units = ["KiB", "MiB", "GiB"];
  let value = size;
  let unit = "B";
  for (const next of units) {
    if (value < 1024) break;
    value /= 1024;
    unit = next;
  }
  return `${value.toFixed(1)} ${unit}`;
}

function stateBadge(state) {
  return el("span", { class: `state state-${state}`, text: STATE_NAMES[state] || state });
}

function alertBox() {
  return el("p", { class: "error", role: "alert" });
}

// ---------------------------------------------------------------- the header

function renderHeader() {
  const who = document.getElementById("who");
  const signOut = document.getElementById("signout");
  const user = me();
  who.textContent = token() && user ? `Signed in as ${displayName(user)}` : "";
  signOut.hidden = !token();
}

async function signOut() {
  try {
    await api("/api/sessions/", { method: "DELETE" });
  } catch {
    // Signed out here either way: the token is forgotten, and expires on its own.
  }
  forget();
  history.pushState(null, "", "/");
  route();
}

// ---------------------------------------------------------------- sign-in

function showSignIn() {
  document.title = "Sign in · fltraining";
  const username = el("input", { id: "username", name: "username", autocomplete: "username", required: true });
  const password = el("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: true });
  const problem = alertBox();
  const button = el("button", { type: "submit", text: "Sign in" });
  const form = el("form", { class: "signin", "aria-labelledby": "signin-title" },
    el("h1", { id: "signin-title", text: "Sign in" }),
    el("p", { text: "With the same user name and password as the API." }),
    el("label", { for: "username", text: "Username" }), username,
    el("label", { for: "password", text: "Password" }), password,
    button, problem);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    problem.textContent = "";
    button.disabled = true;
    try {
      const { data } = await api("/api/sessions/", { method: "POST", headers: { Authorization: basic(username.value, password.value) } });
      sessionStorage.setItem(TOKEN_KEY, data.token);
      sessionStorage.setItem(USER_KEY, JSON.stringify(data.user));
      route();
    } catch (error) {
      problem.textContent = error.message;
      password.select();
    } finally {
      button.disabled = false;
    }
  });
  render(form);
  username.focus();
}

// ---------------------------------------------------------------- shared lookups

async function userNames() {
  const { data } = await api("/api/users/");
  return new Map(data.map((user) => [user.id, user]));
}

async function modelNames() {
  const { data } = await api("/api/models/");
  return new Map(data.map((model) => [model.id, model]));
}

// ---------------------------------------------------------------- the trainings table

async function showTrainings() {
  document.title = "Trainings · fltraining";
  const page = Math.max(1, Number.parseInt(new URLSearchParams(location.search).get("page") || "1", 10) || 1);
  const heading = el("h1", { text: "Trainings" });
  const status = el("p", { class: "muted", "aria-live": "polite", text: "Loading…" });
  const holder = el("div");
  render(heading, status, holder);
  let etag = null;
  let stopped = false;
  let timer = null;
  let users = new Map();
  let models = new Map();

  async function refresh(first) {
    try {
      const query = `/api/users/trainings/?limit=${PAGE_SIZE}&offset=${(page - 1) * PAGE_SIZE}&ordering=-created_at`;
      const answer = await api(query, { etag });
      if (answer.status === 304 || stopped) return;
      etag = answer.etag;
      if (first || answer.data.some((t) => !models.has(t.model) || t.participants.some((p) => !users.has(p)))) {
        [users, models] = await Promise.all([userNames(), modelNames()]);
      }
      holder.replaceChildren(trainingsTable(answer.data, users, models), pager(page, Number(answer.total || 0)));
      status.textContent = `${answer.total} training${answer.total === "1" ? "" : "s"}`;
    } catch (error) {
      status.textContent = error.message;
      if (error.status === 401) return route();
    } finally {
      if (!stopped) timer = setTimeout(refresh, LIST_REFRESH_MS, false);
    }
  }
  live = { stop() { stopped = true; clearTimeout(timer); } };
  await refresh(true);
}

function trainingsTable(trainings, users, models) {
  const rows = trainings.map((training) => {
    const model = models.get(training.model);
    const names = training.participants.map((id) => displayName(users.get(id)));
    return el("tr", {},
      el("td", {}, el("a", { href: `/trainings/${training.id}`, text: model ? model.name : training.model })),
      el("td", {}, stateBadge(training.state)),
      el("td", { text: `${training.round} / ${training.target_num_updates}` }),
      el("td", { title: names.join(", ") },
        el("span", { text: String(names.length) }), " ",
        el("span", { class: "muted names", text: names.join(", ") })),
      el("td", { text: when(training.last_update) }));
  });
  const table = el("table", { class: "trainings" },
    el("caption", { class: "visually-hidden", text: "Trainings you run or take part in, newest first" }),
    el("thead", {}, el("tr", {}, ["Model", "State", "Round / target", "Participants", "Last update"].map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, rows));
  if (!rows.length) return el("p", { text: "No trainings yet: create one through the API (POST /api/trainings/)." });
  return table;
}

function pager(page, total) {
  const pages = Math.max(1, Math.ceil(total / PAGE_SIZE));
  if (pages === 1) return el("span");
  return el("nav", { class: "pager", "aria-label": "Pages" },
    page > 1 ? el("a", { href: `/?page=${page - 1}`, text: "Previous" }) : null,
    el("span", { text: ` Page ${page} of ${pages} ` }),
    page < pages ? el("a", { href: `/?page=${page + 1}`, text: "Next" }) : null);
}

// ---------------------------------------------------------------- a training's page

function describeEvent(event, users) {
  const d = event.data || {};
  const who = event.user ? displayName(users.get(event.user)) : null;
  const round = `Round ${event.round}`;
  switch (event.type) {
    case "round_started":
      return `${round} started with ${(d.participants || []).length} participant(s)`;
    case "aggregated":
      return `${round} aggregated from ${d.updates} update(s), ${d.samples} samples` +
        (d.rule ? ` (${d.rule})` : "") + (typeof d.seconds === "number" ? ` in ${d.seconds.toFixed(2)} s` : "");
    case "daisy_chained":
      return `${round}: ${d.updates} local model(s) handed on to other participants (daisy chain)` +
        (typeof d.seconds === "number" ? ` in ${d.seconds.toFixed(2)} s` : "");
    case "swag_aggregated":
      return `${round}: SWAG moments aggregated from ${d.statistics} statistic(s)`;
    case "testing_started":
      return `${round}: testing started`;
    case "testing_completed":
      return `${round}: testing completed`;
    case "test_metrics_accepted":
      return `${round}: test metrics from ${who}`;
    case "evaluated":
      return `${round}: server evaluation ` + Object.entries(d.metrics || d)
        .filter(([, v]) => typeof v === "number").map(([k, v]) => `${k} ${Number(v.toPrecision(4))}`).join(", ");
    case "evaluation_failed":
      return `${round}: server evaluation failed: ${d.reason || d.detail || "unknown reason"}`;
    case "state_changed":
      return `State changed to ${STATE_NAMES[d.state] || d.state}` + (d.reason ? `: ${d.reason}` : "") + (d.detail ? ` (${d.detail})` : "");
    case "participant_removed":
      return `${who || "A participant"} was removed` + (d.reason ? `: ${d.reason}` : "");
    case "notification_failed":
      return `Notifying ${who || "a participant"} failed` + (d.notification_type ? ` (${d.notification_type})` : "") + (d.detail ? `: ${d.detail}` : "");
    case "lease_expired":
      return `${round}: an aggregation claim expired and was taken over`;
    default:
      return `${event.type}${who ? ` by ${who}` : ""}`;
  }
}

async function showTraining(trainingId) {
  document.title = "Training · fltraining";
  const status = el("p", { class: "muted", "aria-live": "polite", text: "Loading…" });
  render(status);
  let users;
  let training;
  try {
    [users, training] = await Promise.all([userNames(), api(`/api/trainings/${trainingId}/`)]);
  } catch (error) {
    if (error.status === 401) return route();
    render(el("h1", { text: error.status === 404 ? "Training not found" : "Cannot show this training" }),
      el("p", { role: "alert", text: error.message }), el("p", {}, el("a", { href: "/", text: "All trainings" })));
    return;
  }
  const page = new TrainingPage(trainingId, users, training);
  live = page;
  await page.start();
}

class TrainingPage {
  constructor(trainingId, users, answer) {
    this.id = trainingId;
    this.users = users;
    this.training = answer.data;
    this.etag = answer.etag;
    this.events = [];
    this.eventIds = new Set();
    this.stopped = false;
    this.reader = null;
    this.pending = new Map(); // what to refetch, debounced
    this.heading = el("h1", { tabindex: "-1" });
    this.facts = el("dl", { class: "facts" });
    this.progress = el("section", { "aria-labelledby": "progress-title" });
    this.charts = el("div", { class: "charts" });
    this.eventList = el("ol", { class: "events", reversed: true });
    this.models = el("div");
    this.actions = el("section", { "aria-labelledby": "actions-title", class: "actions" });
    this.liveNote = el("p", { class: "muted live", "aria-live": "polite" });
  }

  async start() {
    this.modelName = this.training.model;
    try {
      const { data } = await api(`/api/models/${this.training.model}/metadata/`);
      this.modelName = data.name || data.id;
    } catch {
      // The name is a nicety; the id stands in.
    }
    document.title = `${this.modelName} · fltraining`;
    this.heading.textContent = this.modelName;
    render(
      el("p", {}, el("a", { href: "/", text: "← All trainings" })),
      this.heading, this.liveNote, this.facts, this.actions, this.progress,
      el("section", { "aria-labelledby": "metrics-title" }, el("h2", { id: "metrics-title", text: "Metrics" }), this.charts),
      el("section", { "aria-labelledby": "models-title" }, el("h2", { id: "models-title", text: "Global model" }), this.models),
      el("section", { "aria-labelledby": "events-title" }, el("h2", { id: "events-title", text: "Events" }), this.eventList));
    this.renderFacts();
    this.renderActions();
    try {
      await Promise.all([this.loadProgress(), this.loadMetrics(), this.loadEvents()]);
    } catch (error) {
      if (error.status === 401) return route();
      this.liveNote.textContent = error.message;
      return;
    }
    this.renderModels();
    this.follow();
  }

  stop() {
    this.stopped = true;
    if (this.reader) this.reader.cancel().catch(() => {});
    for (const timer of this.pending.values()) clearTimeout(timer);
  }

  name(userId) {
    return displayName(this.users.get(userId));
  }

  isActor() {
    const user = me();
    return Boolean(user && user.id === this.training.actor);
  }

  renderFacts() {
    const t = this.training;
    const options = t.options || {};
    const rule = options.aggregation ? (options.aggregation.rule || JSON.stringify(options.aggregation)) : "mean";
    const items = [
      ["State", stateBadge(t.state)],
      ["Phase", t.phase || "–"],
      ["Round / target", `${t.round} / ${t.target_num_updates}`],
      ["Aggregation method", t.aggregation_method],
      ["Aggregation rule", rule],
      ["Server optimizer", options.server_optimizer ? (options.server_optimizer.name || JSON.stringify(options.server_optimizer)) : "none"],
      ["Uncertainty", t.uncertainty_method],
      ["Actor", this.name(t.actor)],
      ["Created", when(t.created_at)],
      ["Last update", when(t.last_update)],
    ];
    if (t.privacy && typeof t.privacy.epsilon === "number") items.push(["Privacy ε", t.privacy.epsilon.toFixed(3)]);
    if (t.state_detail) items.push(["State detail", JSON.stringify(t.state_detail)]);
    this.facts.replaceChildren(...items.flatMap(([term, value]) => [el("dt", { text: term }), el("dd", {}, value)]));
  }

  renderActions() {
    if (!this.isActor()) {
      this.actions.replaceChildren();
      this.actions.hidden = true;
      return;
    }
    this.actions.hidden = false;
    const t = this.training;
    const problem = alertBox();
    const act = (question, method, path, body) => async () => {
      if (!window.confirm(question)) return;
      problem.textContent = "";
      try {
        await api(path, { method, body });
        await this.refreshTraining();
      } catch (error) {
        problem.textContent = error.message;
      }
    };
    const others = [...this.users.values()].filter((u) => u.id !== t.actor && !t.participants.includes(u.id));
    const addSelect = el("select", { id: "add-participant" },
      others.map((u) => el("option", { value: u.id, text: displayName(u) })));
    const removeSelect = el("select", { id: "remove-participant" },
      t.participants.map((id) => el("option", { value: id, text: this.name(id) })));
    const selected = (select) => select.value;
    const canChange = t.state === "I";
    this.actions.replaceChildren(
      el("h2", { id: "actions-title", text: "Actions" }),
      el("div", { class: "buttons" },
        el("button", { type: "button", disabled: t.state !== "I", onclick: act("Start this training?", "POST", `/api/trainings/${this.id}/start/`) }, "Start"),
        el("button", { type: "button", disabled: ENDED.has(t.state), onclick: act("Cancel this training? It ends in state Error.", "POST", `/api/trainings/${this.id}/cancel/`) }, "Cancel")),
      el("div", { class: "participant-action" },
        el("label", { for: "add-participant", text: "User to add" }), addSelect,
        el("button", {
          type: "button", disabled: !canChange || !others.length,
          onclick: async () => act(`Add ${addSelect.selectedOptions[0]?.textContent} as a participant?`, "PUT", `/api/trainings/${this.id}/clients/`, { clients: [selected(addSelect)] })(),
        }, "Add participant")),
      el("div", { class: "participant-action" },
        el("label", { for: "remove-participant", text: "Participant to remove" }), removeSelect,
        el("button", {
          type: "button", disabled: ENDED.has(t.state) || !t.participants.length,
          onclick: async () => act(`Remove ${removeSelect.selectedOptions[0]?.textContent} from this training?`, "DELETE", `/api/trainings/${this.id}/clients/`, { clients: [selected(removeSelect)] })(),
        }, "Remove participant")),
      problem);
  }

  async refreshTraining() {
    const answer = await api(`/api/trainings/${this.id}/`, { etag: this.etag });
    if (answer.status === 304) return;
    const grown = answer.data.participants.some((id) => !this.users.has(id));
    this.training = answer.data;
    this.etag = answer.etag;
    if (grown) this.users = await userNames();
    this.renderFacts();
    this.renderActions();
    this.renderModels();
  }

  async loadProgress() {
    const { data } = await api(`/api/trainings/${this.id}/progress/`);
    this.renderProgress(data);
  }

  renderProgress(p) {
    const arrived = new Map(p.arrived.map((a) => [a.user, a]));
    const bar = el("progress", { max: Math.max(1, p.expected_count), value: p.arrived_count, "aria-labelledby": "progress-count" });
    const count = el("p", { id: "progress-count", class: "progress-count", text: `${p.arrived_count} / ${p.expected_count} arrived` });
    const items = p.participants.map((id) => {
      const a = arrived.get(id);
      return el("li", { class: a ? "arrived" : "expected" },
        el("span", { class: "mark", "aria-hidden": "true", text: a ? "✓" : "…" }), " ",
        el("span", { text: this.name(id) }), " — ",
        el("span", { text: a ? `arrived ${time(a.at)}${a.sample_size ? `, ${a.sample_size} samples` : ""}` : "expected" }));
    });
    const phase = p.phase ? `round ${p.round}, phase ${p.phase}` : `round ${p.round}, not waiting for uploads`;
    this.progress.replaceChildren(
      el("h2", { id: "progress-title", text: "Round progress" }),
      el("p", { class: "muted", text: phase + (p.round_deadline ? `, deadline ${when(p.round_deadline)}` : "") }),
      count, bar, el("ul", { class: "participants" }, items));
  }

  async loadMetrics() {
    const { data } = await api(`/api/models/${this.training.model}/metrics/`);
    const byKey = new Map();
    for (const metric of data) {
      if (typeof metric.value_float !== "number") continue;
      const series = byKey.get(metric.key) || new Map();
      const name = metric.reporter ? this.name(metric.reporter) : "server (evaluation)";
      const entry = series.get(name) || { name, server: !metric.reporter, points: [] };
      entry.points.push([metric.step, metric.value_float]);
      series.set(name, entry);
      byKey.set(metric.key, series);
    }
    const keys = [...byKey.keys()].sort();
    if (!keys.length) {
      this.charts.replaceChildren(el("p", { class: "muted", text: "No metrics yet." }));
      return;
    }
    this.charts.replaceChildren(...keys.map((key) => lineChart(key, [...byKey.get(key).values()], "step")));
  }

  async loadEvents() {
    let after = null;
    for (;;) {
      const { data } = await api(`/api/trainings/${this.id}/events/?limit=1000${after ? `&after=${encodeURIComponent(after)}` : ""}`);
      data.forEach((event) => this.addEvent(event));
      if (data.length < 1000) break;
      after = data[data.length - 1].id;
    }
  }

  addEvent(event) {
    if (!event.id || this.eventIds.has(event.id)) return false;
    this.eventIds.add(event.id);
    this.events.push(event);
    const item = el("li", { "data-type": event.type },
      el("time", { datetime: event.at, text: when(event.at) }), " ", el("span", { text: describeEvent(event, this.users) }));
    this.eventList.prepend(item);
    return true;
  }

  renderModels() {
    const t = this.training;
    const versions = this.events.filter((e) => e.type === "aggregated" && e.data && e.data.sha256);
    const rows = versions.slice().reverse().map((e) => el("tr", {},
      el("td", { text: String(e.round + 1) }),
      el("td", { text: typeof e.data.size === "number" ? bytes(e.data.size) : "–" }),
      el("td", {}, el("code", { title: e.data.sha256, text: e.data.sha256.slice(0, 16) + "…" })),
      el("td", { text: e.round + 1 === t.round ? "current" : "replaced" })));
    const download = el("button", { type: "button", onclick: () => this.download() }, `Download the current global model (round ${t.round})`);
    const problem = alertBox();
    this.downloadProblem = problem;
    this.models.replaceChildren(
      el("p", {}, download),
      problem,
      rows.length
        ? el("table", { class: "versions" },
          el("caption", { class: "visually-hidden", text: "Global model versions, newest first" }),
          el("thead", {}, el("tr", {}, ["Round", "Size", "sha256", "Version"].map((h) => el("th", { scope: "col", text: h })))),
          el("tbody", {}, rows))
        : el("p", { class: "muted", text: "No aggregated versions yet: round 0 is the uploaded model." }));
  }

  async download() {
    try {
      const response = await fetch(`/api/models/${this.training.model}/`, { headers: { Authorization: `Token ${token()}` }, cache: "no-store" });
      if (!response.ok) throw new ApiError(response.status, (await response.json().catch(() => ({}))).detail || response.statusText);
      const blob = await response.blob();
      const disposition = response.headers.get("Content-Disposition") || "";
      const match = disposition.match(/filename="?([^";]+)"?/);
      const link = el("a", { href: URL.createObjectURL(blob), download: match ? match[1] : `model-${this.training.model}` });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    } catch (error) {
      this.downloadProblem.textContent = error.message;
    }
  }

  // Debounced refetches: a burst of events costs one request per kind.
  soon(kind, action, delay = 150) {
    if (this.pending.has(kind) || this.stopped) return;
    this.pending.set(kind, setTimeout(async () => {
      this.pending.delete(kind);
      try {
        await action();
      } catch (error) {
        if (error.status === 401) route();
      }
    }, delay));
  }

  onEvent(event) {
    if (event.type === "round_progress") {
      this.soon("progress", () => this.loadProgress(), 0);
      return;
    }
    if (!this.addEvent(event)) return;
    this.soon("training", () => this.refreshTraining());
    this.soon("progress", () => this.loadProgress());
    if (["aggregated", "evaluated", "test_metrics_accepted", "testing_completed", "swag_aggregated", "state_changed"].includes(event.type)) {
      this.soon("metrics", () => this.loadMetrics(), 300);
    }
    if (event.type === "aggregated") this.soon("models", async () => this.renderModels());
  }

  // The events stream, read with fetch (EventSource cannot send the Authorization header); after the
  // service restarts or the connection drops, it reconnects with Last-Event-ID.
  async follow() {
    while (!this.stopped) {
      const last = this.events.length ? this.events.reduce((a, b) => (a.id > b.id ? a : b)).id : null;
      const headers = { Accept: "text/event-stream", Authorization: `Token ${token()}` };
      if (last) headers["Last-Event-ID"] = last;
      try {
        const response = await fetch(`/api/trainings/${this.id}/events/`, { headers, cache: "no-store" });
        if (response.status === 401) return route();
        if (response.status === 403 || response.status === 404) {
          // Deleted, or the user was removed from it: nothing more to follow.
          this.liveNote.textContent = "This training can no longer be followed (deleted, or you left it).";
          return;
        }
        if (!response.ok || !response.body) throw new Error(`events: ${response.status}`);
        this.liveNote.textContent = "Live: following the training's events.";
        this.reader = response.body.getReader();
        await this.readFrames(this.reader);
        this.reader = null;
        // The stream ends when the training has ended and settled, or the service stops.
        await this.refreshTraining();
        if (ENDED.has(this.training.state)) {
          await this.loadProgress();
          await this.loadMetrics();
          this.liveNote.textContent = `The training has ended (${STATE_NAMES[this.training.state]}).`;
          return;
        }
      } catch {
        if (this.stopped) return;
        this.liveNote.textContent = "Connection lost: reconnecting…";
      }
      await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
    }
  }

  async readFrames(reader) {
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done || this.stopped) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = frame.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trimStart()).join("\n");
        if (!data) continue;
        try {
          this.onEvent(JSON.parse(data));
        } catch {
          // A frame that is not an event of ours is skipped.
        }
      }
    }
  }
}

// ---------------------------------------------------------------- routing

function route() {
  if (live) live.stop();
  live = null;
  renderHeader();
  if (!token()) return showSignIn();
  const match = location.pathname.match(/^\/trainings\/([0-9a-fA-F-]{36})\/?$/);
  if (match) return showTraining(match[1]);
  return showTrainings();
}

document.getElementById("signout").addEventListener("click", signOut);
window.addEventListener("popstate", route);
route();
