// The event inspector of the Lehnz reference server. Plain JavaScript, no build step, no
// external resource. What it shows comes from the JSON API (/inspector/api/...) when the
// page opens, when the filters change and whenever the live stream (re)connects; new
// requests arrive over server-sent events (/inspector/stream) without a reload.
"use strict";

(() => {
  const MAX_ROWS = 500; // rows held and shown per table; the API has all the server holds
  const FILTERS = ["user_id", "event_name", "event_family"];

  const $ = (id) => document.getElementById(id);
  const state = {
    events: [], // {id, event, request}, matching the filters, oldest first
    refused: [], // requests, oldest first
    liveEvents: null, // while the events load: what arrived live meanwhile
    liveRefused: null,
    eventsLoad: 0,
    refusedLoad: 0,
    counters: null,
    selected: null, // {kind: "event" | "refused", id}
    tab: "events",
    keep: null,
  };

  // -- helpers ---------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function pad(n, width) {
    return String(n).padStart(width, "0");
  }

  function clock(seconds) {
    const d = new Date(seconds * 1000);
    return `${pad(d.getHours(), 2)}:${pad(d.getMinutes(), 2)}:${pad(d.getSeconds(), 2)}.${pad(d.getMilliseconds(), 3)}`;
  }

  function filters() {
    const values = {};
    for (const name of FILTERS) values[name] = $(`filter-${name}`).value.trim();
    return values;
  }

  function matches(event) {
    const wanted = filters();
    return FILTERS.every((name) => !wanted[name] || event[name] === wanted[name]);
  }

  function jsonNode(value) {
    // JSON, indented, with its tokens coloured; text nodes only (no HTML is parsed).
    const pre = el("pre", "json");
    const text = JSON.stringify(value, null, 2);
    const token = /("(?:\\.|[^"\\])*")(\s*:)?|\b(true|false|null)\b|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g;
    let last = 0;
    for (const m of text.matchAll(token)) {
      if (m.index > last) pre.append(text.slice(last, m.index));
      const kind = m[1] ? (m[2] ? "key" : "string") : m[3] ? "literal" : "number";
      pre.append(el("span", `j-${kind}`, m[1] || m[0]));
      if (m[2]) pre.append(m[2]);
      last = m.index + m[0].length;
    }
    pre.append(text.slice(last));
    return pre;
  }

  async function getJSON(url, options) {
    const response = await fetch(url, options);
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  // -- counters --------------------------------------------------------------------------

  function newer(a, b) {
    // whether reading a is not older than reading b
    if (!b) return true;
    return a.resets !== b.resets ? a.resets > b.resets : a.last_request >= b.last_request;
  }

  function setCounters(counters) {
    if (!counters || !newer(counters, state.counters)) return;
    state.counters = counters;
    for (const name of ["events", "requests", "refused", "duplicates"]) {
      $(`counter-${name}`).textContent = counters[name].toLocaleString("en-US");
    }
    $("tab-refused-count").textContent = counters.refused.toLocaleString("en-US");
    showHolding();
  }

  function showHolding() {
    const held = state.counters ? state.counters.held : 0;
    const bound = state.keep === null ? "everything it receives" : `the last ${state.keep.toLocaleString("en-US")} events`;
    $("holding").textContent = `The server holds ${held.toLocaleString("en-US")} events (it keeps ${bound}); this page shows the last ${MAX_ROWS} that match.`;
  }

  // -- the events table ------------------------------------------------------------------

  function eventRow(item, fresh) {
    const e = item.event;
    const row = el("tr", fresh ? "fresh" : "");
    row.dataset.id = item.id;
    row.tabIndex = 0;
    row.append(
      el("td", "num", item.id),
      el("td", "num", clock(item.request.time)),
      el("td", "mono", e.user_id),
      el("td", "", e.event_name),
    );
    const family = el("td");
    family.append(el("span", `family ${e.event_family}`, e.event_family));
    row.append(family, el("td", "mono", e.item_id ?? ""), el("td", "num", `#${item.request.id}`));
    if (isSelected("event", item.id)) row.classList.add("selected");
    return row;
  }

  function renderEvents() {
    const body = $("events").tBodies[0];
    body.replaceChildren(...state.events.slice().reverse().map((item) => eventRow(item, false)));
    updateEventsEmpty();
  }

  function updateEventsEmpty() {
    const empty = $("events-empty");
    const filtered = FILTERS.some((name) => filters()[name]);
    empty.hidden = state.events.length > 0;
    empty.textContent = filtered
      ? "No event matches these filters."
      : `No events yet. Send some to ${location.origin}/api/v1/events/ingest (any lehnz_pk_... key).`;
    $("tab-events-count").textContent = state.events.length.toLocaleString("en-US");
  }

  function addEvents(items) {
    const fresh = items.filter((item) => matches(item.event));
    if (!fresh.length) return;
    state.events.push(...fresh);
    const body = $("events").tBodies[0];
    for (const item of fresh) body.prepend(eventRow(item, true));
    while (state.events.length > MAX_ROWS) {
      state.events.shift();
      body.lastElementChild.remove();
    }
    updateEventsEmpty();
  }

  async function loadEvents() {
    const load = ++state.eventsLoad;
    state.liveEvents = [];
    const params = new URLSearchParams({ limit: String(MAX_ROWS) });
    for (const [name, value] of Object.entries(filters())) if (value) params.set(name, value);
    let data;
    try {
      data = await getJSON(`/inspector/api/events?${params}`);
    } catch (error) {
      if (load === state.eventsLoad) state.liveEvents = null;
      return; // the stream reconnects, and loads again
    }
    if (load !== state.eventsLoad) return; // the filters changed meanwhile
    const live = state.liveEvents;
    state.liveEvents = null;
    state.keep = data.keep;
    state.events = data.events;
    for (const item of live) if (item.id > data.last_id && matches(item.event)) state.events.push(item);
    state.events = state.events.slice(-MAX_ROWS);
    setCounters(data.counters);
    renderEvents();
  }

  // -- the refused table -----------------------------------------------------------------

  function refusedRow(request, fresh) {
    const row = el("tr", fresh ? "fresh" : "");
    row.dataset.id = request.id;
    row.tabIndex = 0;
    const status = el("td");
    status.append(el("span", "status", request.status || "none"));
    const event = request.event === null ? "" : JSON.stringify(request.event);
    row.append(
      el("td", "num", `#${request.id}`),
      el("td", "num", clock(request.time)),
      status,
      el("td", "message", request.message ?? ""),
      el("td", "num", request.batch_size ?? "?"),
      el("td", "mono event", event),
    );
    if (isSelected("refused", request.id)) row.classList.add("selected");
    return row;
  }

  function renderRefused() {
    const body = $("refused").tBodies[0];
    body.replaceChildren(...state.refused.slice().reverse().map((r) => refusedRow(r, false)));
    $("refused-empty").hidden = state.refused.length > 0;
  }

  function addRefused(request) {
    state.refused.push(request);
    const body = $("refused").tBodies[0];
    body.prepend(refusedRow(request, true));
    while (state.refused.length > MAX_ROWS) {
      state.refused.shift();
      body.lastElementChild.remove();
    }
    $("refused-empty").hidden = true;
  }

  async function loadRefused() {
    const load = ++state.refusedLoad;
    state.liveRefused = [];
    let data;
    try {
      data = await getJSON(`/inspector/api/refused?limit=${MAX_ROWS}`);
    } catch (error) {
      if (load === state.refusedLoad) state.liveRefused = null;
      return;
    }
    if (load !== state.refusedLoad) return;
    const live = state.liveRefused;
    state.liveRefused = null;
    state.refused = data.refused;
    for (const request of live) if (request.id > data.last_id) state.refused.push(request);
    state.refused = state.refused.slice(-MAX_ROWS);
    setCounters(data.counters);
    renderRefused();
  }

  // -- details ---------------------------------------------------------------------------

  function isSelected(kind, id) {
    return state.selected !== null && state.selected.kind === kind && state.selected.id === id;
  }

  function requestDetails(request) {
    const list = el("dl");
    list.id = "detail-request";
    const outcome = request.status ? `${request.status} ${request.outcome}` : `no answer (${request.outcome})`;
    const rows = [
      ["request", `#${request.id}`, "detail-request-id"],
      ["received", `${new Date(request.time * 1000).toLocaleDateString("en-CA")} ${clock(request.time)}`],
      ["answer", outcome, "detail-status"],
      ["batch size", request.batch_size === null ? "unknown" : `${request.batch_size} event(s)`, "detail-batch-size"],
      ["Idempotency-Key", request.idempotency_key ?? "(none)", "detail-idempotency-key"],
      ["body", `${request.body_bytes.toLocaleString("en-US")} bytes`],
      ["from", request.remote ?? "?"],
      ["answered in", `${request.duration_ms} ms`],
    ];
    for (const [name, value, id] of rows) {
      const dd = el("dd", "", value);
      if (id) dd.id = id;
      list.append(el("dt", "", name), dd);
    }
    const headers = el("table", "headers");
    headers.id = "detail-headers";
    for (const [name, value] of Object.entries(request.headers)) {
      const row = el("tr");
      const masked = /^(x-api-key|authorization|proxy-authorization|cookie)$/i.test(name);
      row.append(el("td", "", name), el("td", masked ? "masked" : "", value));
      headers.append(row);
    }
    return [el("h3", "", "The request it came in"), list, el("h3", "", "Headers (secrets masked)"), headers];
  }

  function showEvent(item) {
    const detail = $("detail");
    const title = el("h2", "", `Event #${item.id}`);
    const json = jsonNode(item.event);
    json.id = "detail-json";
    detail.replaceChildren(title, json, ...requestDetails(item.request));
  }

  function showRefused(request) {
    const detail = $("detail");
    const reason = el("p", "reason", `${request.status || "no answer"} · ${request.message ?? "no message"}`);
    reason.id = "detail-reason";
    const parts = [el("h2", "", `Refused request #${request.id}`), reason, el("h3", "", "The event refused")];
    if (request.event === null) {
      parts.push(el("p", "placeholder", "Not known: the server named no event for this answer."));
    } else {
      const json = jsonNode(request.event);
      json.id = "detail-json";
      parts.push(json);
    }
    detail.replaceChildren(...parts, ...requestDetails(request));
  }

  function select(kind, id) {
    state.selected = { kind, id };
    for (const row of document.querySelectorAll(".grid tbody tr.selected")) row.classList.remove("selected");
    const table = kind === "event" ? "events" : "refused";
    const row = document.querySelector(`#${table} tbody tr[data-id="${id}"]`);
    if (row) row.classList.add("selected");
    if (kind === "event") {
      const item = state.events.find((candidate) => candidate.id === id);
      if (item) showEvent(item);
    } else {
      const request = state.refused.find((candidate) => candidate.id === id);
      if (request) showRefused(request);
    }
  }

  function clearDetail() {
    state.selected = null;
    $("detail").replaceChildren(el("p", "placeholder", "Click an event to see its JSON and the request it came in."));
  }

  // -- the live stream -------------------------------------------------------------------

  function onRequest(message) {
    const request = message.request;
    const items = message.events.map((e) => ({ id: e.id, event: e.event, request }));
    if (state.liveEvents !== null) state.liveEvents.push(...items);
    else addEvents(items);
    if (request.outcome === "refused") {
      if (state.liveRefused !== null) state.liveRefused.push(request);
      else addRefused(request);
    }
    setCounters(message.counters);
  }

  function reloadAll() {
    loadEvents();
    loadRefused();
  }

  function connect() {
    const stream = new EventSource("/inspector/stream");
    stream.addEventListener("open", () => {
      document.body.dataset.stream = "live";
      $("stream-status").textContent = "live";
      reloadAll(); // whatever was missed while disconnected
    });
    stream.addEventListener("error", () => {
      document.body.dataset.stream = "connecting";
      $("stream-status").textContent = "reconnecting…";
    });
    stream.addEventListener("request", (e) => onRequest(JSON.parse(e.data)));
    stream.addEventListener("reset", (e) => {
      state.counters = null;
      setCounters(JSON.parse(e.data).counters);
      clearDetail();
      reloadAll();
    });
  }

  // -- wiring ----------------------------------------------------------------------------

  function showTab(tab) {
    state.tab = tab;
    for (const button of document.querySelectorAll(".tab")) {
      const active = button.dataset.tab === tab;
      button.classList.toggle("active", active);
      button.setAttribute("aria-selected", String(active));
    }
    $("panel-events").hidden = tab !== "events";
    $("panel-refused").hidden = tab !== "refused";
  }

  function onRowClick(kind) {
    return (e) => {
      const row = e.target.closest("tr[data-id]");
      if (row) select(kind, Number(row.dataset.id));
    };
  }

  function onRowKey(kind) {
    return (e) => {
      if (e.key === "Enter" || e.key === " ") {
        const row = e.target.closest("tr[data-id]");
        if (row) {
          e.preventDefault();
          select(kind, Number(row.dataset.id));
        }
      }
    };
  }

  function init() {
    $("endpoint").textContent = `${location.origin}/api/v1/events/ingest`;
    showHolding();
    updateEventsEmpty();
    for (const button of document.querySelectorAll(".tab")) {
      button.addEventListener("click", () => showTab(button.dataset.tab));
    }
    $("events").tBodies[0].addEventListener("click", onRowClick("event"));
    $("refused").tBodies[0].addEventListener("click", onRowClick("refused"));
    $("events").tBodies[0].addEventListener("keydown", onRowKey("event"));
    $("refused").tBodies[0].addEventListener("keydown", onRowKey("refused"));
    let typing = null;
    const form = $("filters");
    form.addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(loadEvents, 150);
    });
    $("filter-event_family").addEventListener("change", () => {
      clearTimeout(typing);
      loadEvents();
    });
    form.addEventListener("reset", () => {
      clearTimeout(typing);
      setTimeout(loadEvents, 0); // after the form has cleared its fields
    });
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      clearTimeout(typing);
      loadEvents();
    });
    $("reset").addEventListener("click", async () => {
      if (!window.confirm("Forget every event and request the server holds?")) return;
      await fetch("/inspector/api/reset", { method: "POST" });
    });
    connect();
  }

  init();
})();
