// The event inspector of the Lehnz reference server. Plain JavaScript, no build step, no
// external resource. What it shows comes from the JSON API (/inspector/api/...) when the
// page opens, when the filters change and whenever the live stream (re)connects; new
// requests arrive over server-sent events (/inspector/stream) without a reload.
"use strict";

(() => {
  const PAGE = 500; // rows loaded at once; "Load older" adds as many again
  const FILTERS = ["user_id", "event_name", "event_family", "item_id", "recommendation_id", "session_id", "q"];
  const MAX_PENDING = 5000; // messages kept while paused; past that, resume reloads

  const $ = (id) => document.getElementById(id);
  const state = {
    loaded: false, // nothing is shown as a number before the first answer
    events: [], // {id, event, request}, matching the filters, oldest first
    eventsMore: false, // whether older matching events are held beyond state.events
    cap: PAGE, // rows kept (the oldest go past it); grows with "Load older"
    refused: [], // requests, oldest first
    liveEvents: null, // while the events load: what arrived live meanwhile
    liveRefused: null,
    eventsLoad: 0,
    refusedLoad: 0,
    counters: null,
    lastId: 0, // the last event id known
    eventsThrough: 0, // the events table holds what matches up to this id
    refusedThrough: 0,
    selected: null, // {kind: "event" | "refused", id}
    tab: "events",
    keep: null,
    paused: false,
    pending: [], // stream messages that arrived while paused
    stale: false, // while paused: resume must reload instead of replaying `pending`
    timeline: null, // {user, ids, anonymous, links, events, more}
    timelineLoad: 0,
    timelineTimer: null,
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

  const number = (n) => n.toLocaleString("en-US");

  function filters() {
    const values = {};
    for (const name of FILTERS) values[name] = $(`filter-${name}`).value.trim();
    return values;
  }

  function texts(event) {
    // as the server searches: string and number values at any depth, nested objects' keys
    const found = [];
    const stack = [[event, true]];
    while (stack.length) {
      const [value, top] = stack.pop();
      if (typeof value === "string") found.push(value);
      else if (typeof value === "number") found.push(String(value));
      else if (Array.isArray(value)) for (const v of value) stack.push([v, false]);
      else if (value && typeof value === "object") {
        if (!top) found.push(...Object.keys(value));
        for (const v of Object.values(value)) stack.push([v, false]);
      }
    }
    return found;
  }

  function matches(event) {
    const wanted = filters();
    for (const name of FILTERS) {
      if (name !== "q" && wanted[name] && event[name] !== wanted[name]) return false;
    }
    const needle = wanted.q.toLowerCase();
    return !needle || texts(event).some((text) => text.toLowerCase().includes(needle));
  }

  function filterParams() {
    const params = new URLSearchParams();
    for (const [name, value] of Object.entries(filters())) if (value) params.set(name, value);
    return params;
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

  // -- counters and first paint ----------------------------------------------------------

  function newer(a, b) {
    // whether reading a is not older than reading b
    if (!b) return true;
    return a.resets !== b.resets ? a.resets > b.resets : a.last_request >= b.last_request;
  }

  function setCounters(counters) {
    if (!counters || !newer(counters, state.counters)) return;
    state.counters = counters;
    for (const name of ["events", "requests", "refused", "duplicates"]) {
      $(`counter-${name}`).textContent = number(counters[name]);
    }
    $("tab-refused-count").textContent = number(counters.refused);
    document.querySelector(".counters").setAttribute("aria-busy", "false");
    showHolding();
  }

  function loaded(data) {
    state.keep = data.keep;
    state.lastId = Math.max(state.lastId, data.last_id ?? 0);
    if (!state.loaded) {
      state.loaded = true;
      document.body.dataset.loaded = "true";
    }
  }

  function showHolding() {
    if (!state.loaded || !state.counters) return; // "Loading…" until the server answered
    const held = number(state.counters.held);
    const bound = state.keep === null ? "everything it receives" : `the last ${number(state.keep)} events`;
    const older = state.eventsMore ? "; older ones that match: “Load older events”" : "";
    $("holding").textContent = `The server holds ${held} events (it keeps ${bound}); this page shows ${number(state.events.length)} that match${older}.`;
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
    const filtered = Object.values(filters()).some(Boolean);
    empty.hidden = state.events.length > 0;
    empty.textContent = filtered
      ? "No event matches these filters."
      : `No events yet. Send some to ${location.origin}/api/v1/events/ingest (any lehnz_pk_... key).`;
    $("tab-events-count").textContent = number(state.events.length);
    $("events-older").hidden = !state.eventsMore;
    updateExports();
    showHolding();
  }

  function updateExports() {
    const params = filterParams();
    if (state.paused) params.set("before", String(state.lastId + 1)); // what the page shows
    for (const format of ["json", "csv"]) {
      params.set("format", format);
      $(`export-${format}`).href = `/inspector/api/export?${params}`;
    }
  }

  function addEvents(items) {
    state.lastId = Math.max(state.lastId, ...items.map((item) => item.id));
    const fresh = items.filter((item) => item.id > state.eventsThrough && matches(item.event));
    state.eventsThrough = Math.max(state.eventsThrough, ...items.map((item) => item.id));
    if (!fresh.length) return;
    state.events.push(...fresh);
    const body = $("events").tBodies[0];
    for (const item of fresh) body.prepend(eventRow(item, true));
    while (state.events.length > state.cap) {
      state.events.shift();
      body.lastElementChild.remove();
      state.eventsMore = true;
    }
    updateEventsEmpty();
  }

  async function loadEvents() {
    const load = ++state.eventsLoad;
    state.liveEvents = [];
    state.cap = PAGE;
    const params = filterParams();
    params.set("limit", String(PAGE));
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
    loaded(data);
    state.events = data.events;
    state.eventsMore = data.more;
    state.eventsThrough = data.last_id;
    for (const item of live) {
      if (item.id > state.eventsThrough && matches(item.event)) state.events.push(item);
      state.eventsThrough = Math.max(state.eventsThrough, item.id);
    }
    if (state.events.length > state.cap) {
      state.events = state.events.slice(-state.cap);
      state.eventsMore = true;
    }
    setCounters(data.counters);
    renderEvents();
  }

  async function loadOlderEvents() {
    if (!state.events.length) return;
    const load = state.eventsLoad;
    const params = filterParams();
    params.set("before", String(state.events[0].id));
    params.set("limit", String(PAGE));
    let data;
    try {
      data = await getJSON(`/inspector/api/events?${params}`);
    } catch (error) {
      return; // the button stays: try again
    }
    if (load !== state.eventsLoad) return;
    state.events = data.events.concat(state.events);
    state.cap = state.events.length + PAGE; // room for live rows before the oldest go
    state.eventsMore = data.more;
    const body = $("events").tBodies[0];
    body.append(...data.events.slice().reverse().map((item) => eventRow(item, false)));
    updateEventsEmpty();
  }

  // -- the timeline ----------------------------------------------------------------------

  function timelineItem(item, anonymous) {
    const e = item.event;
    const li = el("li", "", null);
    li.dataset.id = item.id;
    li.tabIndex = 0;
    const when = el("span", "when", clock(item.request.time));
    if (typeof e.previous_user_id === "string" && e.previous_user_id) {
      li.className = "identify";
      const text = el("span", "what");
      text.append(
        el("span", "who anon", e.previous_user_id),
        " signed in as ",
        el("span", "who account", e.user_id),
        el("span", "note", " (identify)"),
      );
      li.append(when, text);
    } else {
      const who = el("span", `who ${anonymous.has(e.user_id) ? "anon" : "account"}`, e.user_id);
      const family = el("span", `family ${e.event_family}`, e.event_family);
      const what = el("span", "what");
      what.append(el("strong", "", e.event_name), " ", family);
      if (e.item_id) what.append(" ", el("span", "item", e.item_id));
      li.append(when, who, what);
    }
    if (isSelected("event", item.id)) li.classList.add("selected");
    return li;
  }

  function renderTimeline() {
    const t = state.timeline;
    const list = $("timeline");
    const ids = $("timeline-ids");
    if (!t) {
      list.replaceChildren();
      ids.hidden = true;
      $("timeline-empty").hidden = false;
      return;
    }
    const anonymous = new Set(t.anonymous);
    list.replaceChildren(...t.events.map((item) => timelineItem(item, anonymous)));
    const chips = t.ids.map((id) => {
      const chip = el("span", "chip");
      chip.append(el("span", `who ${anonymous.has(id) ? "anon" : "account"}`, id));
      if (t.links.length) chip.append(el("span", "kind", anonymous.has(id) ? " anonymous" : " signed in"));
      return chip;
    });
    const joined = t.links.length === 1 ? "1 identify event" : `${t.links.length} identify events`;
    const summary = el("span", "", t.ids.length > 1 ? ` joined by ${joined}` : " (no identify event joins another id to it)");
    ids.replaceChildren(el("strong", "", `${number(t.events.length)} events of `), ...chips.flatMap((c, i) => (i ? [" + ", c] : [c])), summary);
    ids.hidden = false;
    const empty = $("timeline-empty");
    empty.hidden = t.events.length > 0;
    empty.textContent = `No event of ${t.user} is held.`;
    $("timeline-older").hidden = !t.more;
    for (const format of ["json", "csv"]) {
      const link = $(`timeline-export-${format}`);
      link.href = `/inspector/api/export?${new URLSearchParams({ format, timeline: t.user })}`;
      link.hidden = false;
    }
  }

  async function loadTimeline(user, older) {
    if (!user) return;
    const load = older ? state.timelineLoad : ++state.timelineLoad;
    const params = new URLSearchParams({ user_id: user, limit: String(PAGE) });
    if (older) params.set("before", String(state.timeline.events[0].id));
    let data;
    try {
      data = await getJSON(`/inspector/api/timeline?${params}`);
    } catch (error) {
      return;
    }
    if (load !== state.timelineLoad) return;
    loaded(data);
    const events = older ? data.events.concat(state.timeline.events) : data.events;
    state.timeline = { user, ids: data.ids, anonymous: data.anonymous, links: data.links, events, more: data.more };
    renderTimeline();
  }

  function showTimeline(user) {
    $("timeline-user").value = user;
    showTab("timeline");
    loadTimeline(user, false);
  }

  function touchesTimeline(items) {
    const t = state.timeline;
    if (!t) return false;
    const ids = new Set(t.ids);
    return items.some((item) => ids.has(item.event.user_id) || ids.has(item.event.previous_user_id));
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
    $("refused-empty").textContent = "No refused request.";
    $("refused-empty").hidden = state.refused.length > 0;
  }

  function addRefused(request) {
    if (request.id <= state.refusedThrough) return; // loaded already
    state.refusedThrough = request.id;
    state.refused.push(request);
    const body = $("refused").tBodies[0];
    body.prepend(refusedRow(request, true));
    while (state.refused.length > PAGE) {
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
      data = await getJSON(`/inspector/api/refused?limit=${PAGE}`);
    } catch (error) {
      if (load === state.refusedLoad) state.liveRefused = null;
      return;
    }
    if (load !== state.refusedLoad) return;
    const live = state.liveRefused;
    state.liveRefused = null;
    state.refused = data.refused;
    state.refusedThrough = data.last_id;
    for (const request of live) {
      if (request.id > state.refusedThrough) state.refused.push(request);
      state.refusedThrough = Math.max(state.refusedThrough, request.id);
    }
    state.refused = state.refused.slice(-PAGE);
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
      ["body", `${number(request.body_bytes)} bytes`],
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
      const masked = value.includes("****");
      row.append(el("td", "", name), el("td", masked ? "masked" : "", value));
      headers.append(row);
    }
    return [el("h3", "", "The request it came in"), list, el("h3", "", "Headers (secrets and keys masked)"), headers];
  }

  function showEvent(item) {
    const title = el("h2", "", `Event #${item.id}`);
    const json = jsonNode(item.event);
    json.id = "detail-json";
    const button = el("button", "button", `Timeline of ${item.event.user_id}`);
    button.type = "button";
    button.id = "detail-timeline";
    button.addEventListener("click", () => showTimeline(item.event.user_id));
    $("detail").replaceChildren(title, json, el("p", "detail-actions"), ...requestDetails(item.request));
    $("detail").querySelector(".detail-actions").append(button);
  }

  function showRefused(request) {
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
    $("detail").replaceChildren(...parts, ...requestDetails(request));
  }

  function select(kind, id) {
    state.selected = { kind, id };
    for (const node of document.querySelectorAll(".selected")) node.classList.remove("selected");
    const where = kind === "event" ? ["#events tbody tr", "#timeline li"] : ["#refused tbody tr"];
    for (const selector of where) {
      const node = document.querySelector(`${selector}[data-id="${id}"]`);
      if (node) node.classList.add("selected");
    }
    if (kind === "event") {
      const shown = state.events.concat(state.timeline ? state.timeline.events : []);
      const item = shown.find((candidate) => candidate.id === id);
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

  // -- the live stream, and pause --------------------------------------------------------

  function onRequest(message) {
    const request = message.request;
    const items = message.events.map((e) => ({ id: e.id, event: e.event, request }));
    setCounters(message.counters);
    if (state.paused) {
      if (state.pending.length < MAX_PENDING) state.pending.push(message);
      else state.stale = true;
      showPaused();
      return;
    }
    if (state.liveEvents !== null) state.liveEvents.push(...items);
    else addEvents(items);
    if (request.outcome === "refused") {
      if (state.liveRefused !== null) state.liveRefused.push(request);
      else addRefused(request);
    }
    if (touchesTimeline(items)) {
      clearTimeout(state.timelineTimer);
      state.timelineTimer = setTimeout(() => loadTimeline(state.timeline.user, false), 100);
    }
  }

  function reloadAll() {
    if (state.paused) {
      state.stale = true; // on resume
      return;
    }
    loadEvents();
    loadRefused();
    if (state.timeline) loadTimeline(state.timeline.user, false);
  }

  function showPaused() {
    const button = $("pause");
    const waiting = state.pending.reduce((n, m) => n + m.events.length, 0);
    button.textContent = state.paused ? `Resume${waiting || state.stale ? ` (${state.stale ? "many" : number(waiting)} new)` : ""}` : "Pause";
    button.setAttribute("aria-pressed", String(state.paused));
    document.body.dataset.paused = String(state.paused);
    const live = document.body.dataset.stream === "live";
    $("stream-status").textContent = state.paused ? "paused" : live ? "live" : "reconnecting…";
  }

  function setPaused(paused) {
    if (paused === state.paused) return;
    state.paused = paused;
    if (!paused) {
      const pending = state.pending;
      const stale = state.stale;
      state.pending = [];
      state.stale = false;
      if (stale) reloadAll();
      else for (const message of pending) onRequest(message);
    }
    showPaused();
    updateExports();
  }

  function connect() {
    const stream = new EventSource("/inspector/stream");
    stream.addEventListener("open", () => {
      document.body.dataset.stream = "live";
      showPaused();
      reloadAll(); // whatever was missed while disconnected
    });
    stream.addEventListener("error", () => {
      document.body.dataset.stream = "connecting";
      showPaused();
    });
    stream.addEventListener("request", (e) => onRequest(JSON.parse(e.data)));
    stream.addEventListener("reset", (e) => {
      state.counters = null;
      setCounters(JSON.parse(e.data).counters);
      if (state.paused) {
        state.pending = [];
        state.stale = true;
        showPaused();
        return;
      }
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
    for (const name of ["events", "timeline", "refused"]) $(`panel-${name}`).hidden = tab !== name;
  }

  function onPick(kind, selector) {
    const pick = (e) => {
      const node = e.target.closest(selector);
      if (node) select(kind, Number(node.dataset.id));
    };
    return [
      pick,
      (e) => {
        if (e.key === "Enter" || e.key === " ") {
          e.preventDefault();
          pick(e);
        }
      },
    ];
  }

  function listen(element, kind, selector) {
    const [click, key] = onPick(kind, selector);
    element.addEventListener("click", click);
    element.addEventListener("keydown", key);
  }

  function init() {
    $("endpoint").textContent = `${location.origin}/api/v1/events/ingest`;
    for (const button of document.querySelectorAll(".tab")) {
      button.addEventListener("click", () => showTab(button.dataset.tab));
    }
    listen($("events").tBodies[0], "event", "tr[data-id]");
    listen($("timeline"), "event", "li[data-id]");
    listen($("refused").tBodies[0], "refused", "tr[data-id]");
    let typing = null;
    const form = $("filters");
    const reload = () => {
      clearTimeout(typing);
      updateExports();
      loadEvents();
    };
    form.addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(reload, 150);
    });
    $("filter-event_family").addEventListener("change", reload);
    form.addEventListener("reset", () => setTimeout(reload, 0)); // once the fields cleared
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      reload();
    });
    $("events-older").addEventListener("click", () => loadOlderEvents());
    $("timeline-form").addEventListener("submit", (e) => {
      e.preventDefault();
      loadTimeline($("timeline-user").value.trim(), false);
    });
    $("timeline-older").addEventListener("click", () => loadTimeline(state.timeline.user, true));
    $("pause").addEventListener("click", () => setPaused(!state.paused));
    $("reset").addEventListener("click", async () => {
      if (!window.confirm("Forget every event and request the server holds?")) return;
      await fetch("/inspector/api/reset", { method: "POST" });
    });
    updateExports();
    connect();
  }

  init();
})();
