// avr-llm-proxy console: the live calls table and a call's timeline.
// Everything is written with textContent: nothing from a call (a caller's name, what was said) is
// ever parsed as HTML.
"use strict";

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function clock(seconds) {
  if (!seconds) return "-";
  return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
}

function circuitText(circuit) {
  if (!circuit) return "-";
  if (typeof circuit === "string") return circuit;
  return circuit.state || JSON.stringify(circuit);
}

function renderCalls(table) {
  document.getElementById("circuit").textContent = circuitText(table.circuit);
  document.getElementById("rate").textContent = table.turns_per_s.toFixed(1);
  const body = document.querySelector("#calls tbody");
  const rows = table.calls.map((call) => {
    const row = document.createElement("tr");
    row.dataset.uuid = call.uuid;
    const link = document.createElement("a");
    link.href = "/console/calls/" + encodeURIComponent(call.uuid);
    link.textContent = call.uuid.slice(0, 8);
    link.className = "mono";
    cell(row, "").appendChild(link);
    cell(row, call.number, "mono caller");
    cell(row, call.presentation);
    cell(row, call.source);
    cell(row, call.called, "mono");
    cell(row, call.turns, "num turns");
    cell(row, call.latency_ms === null ? null : call.latency_ms.toFixed(1) + " ms", "num");
    cell(row, call.status, "status status-" + call.status);
    cell(row, call.action);
    cell(row, clock(call.started_at));
    return row;
  });
  body.replaceChildren(...rows);
  document.getElementById("empty").hidden = rows.length > 0;
}

function follow(onTable) {
  const feed = document.getElementById("feed");
  const source = new EventSource("/console/events");
  source.addEventListener("calls", (event) => {
    if (feed) feed.textContent = "live";
    onTable(JSON.parse(event.data));
  });
  source.onerror = () => { if (feed) feed.textContent = "reconnecting"; };
}

function entry(event) {
  const item = document.createElement("li");
  item.className = "event event-" + event.kind;
  const when = document.createElement("span");
  when.className = "when";
  when.textContent = clock(event.at);
  const kind = document.createElement("span");
  kind.className = "kind";
  item.append(when, kind);
  const note = (text, className) => {
    const p = document.createElement("p");
    p.className = className;
    p.textContent = text;
    item.appendChild(p);
  };
  if (event.kind === "turn") {
    kind.textContent = "turn " + event.turn;
    const outcome = event.status === "superseded" ? "stale"
      : String(event.status).startsWith("fallback") ? event.status : "answered";
    const status = document.createElement("span");
    status.className = "outcome" + (outcome.startsWith("fallback") ? " bad" : "");
    status.textContent = outcome + (event.filler ? ", filler said" : "");
    item.appendChild(status);
    note("caller: " + event.said, "said");
    for (const sentence of event.spoken || []) note("bot: " + sentence, "spoken");
    const first = event.first_ms === null || event.first_ms === undefined ? "-" : event.first_ms + " ms";
    note("API " + event.latency_ms + " ms, first sentence " + first + ", worker " + event.worker, "figures");
  } else if (event.kind === "capture") {
    kind.textContent = "captured";
    note(event.number + " (" + event.presentation + ") by " + event.source, "said");
  } else if (event.kind === "action") {
    kind.textContent = "action";
    note(event.action, "said");
  } else {
    kind.textContent = event.kind === "start" ? "call started" : "call ended";
  }
  return item;
}

async function renderTimeline(uuid) {
  const answer = await fetch("/console/api/calls/" + encodeURIComponent(uuid), { credentials: "same-origin" });
  document.getElementById("missing").hidden = answer.ok;
  if (!answer.ok) return;
  const call = await answer.json();
  document.getElementById("uuid").textContent = call.uuid;
  document.getElementById("caller").textContent = call.number + " (" + call.presentation + ")";
  document.getElementById("called").textContent = call.called || "-";
  document.getElementById("turns").textContent = call.turns;
  document.getElementById("timeline").replaceChildren(...call.events.map(entry));
}

const SVG = "http://www.w3.org/2000/svg";
const SERIES = ["api_p50", "api_p99", "added_p50", "added_p99"];

function svg(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (text !== undefined) element.textContent = text;
  return element;
}

function drawChart(data) {
  const width = 720, height = 190, left = 52, right = 12, top = 10, bottom = 24;
  const minutes = data.minutes;
  let max = 1;
  for (const minute of minutes) for (const key of SERIES) if (minute[key] !== null) max = Math.max(max, minute[key]);
  const x = (index) => left + (index * (width - left - right)) / Math.max(1, minutes.length - 1);
  const y = (value) => top + (height - top - bottom) * (1 - value / max);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, "data-turns": minutes.reduce((n, m) => n + m.turns, 0) });
  chart.append(
    svg("line", { class: "axis", x1: left, y1: y(0), x2: width - right, y2: y(0) }),
    svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: y(0) }),
    svg("text", { x: left - 6, y: y(max) + 4, "text-anchor": "end" }, max.toFixed(max < 10 ? 1 : 0)),
    svg("text", { x: left - 6, y: y(0) + 4, "text-anchor": "end" }, "0"),
    svg("text", { x: left, y: height - 6 }, "-60 min"),
    svg("text", { x: width - right, y: height - 6, "text-anchor": "end" }, "now"),
  );
  for (const key of SERIES) {
    const points = minutes.map((minute, index) => minute[key] === null ? null : [x(index), y(minute[key])])
      .filter((point) => point !== null);
    chart.appendChild(svg("polyline", { class: "line " + key, points: points.map((p) => p.join(",")).join(" "),
                                        "data-points": points.length }));
    // A dot per minute: a minute alone (a line of one point) shows too.
    for (const [cx, cy] of points) chart.appendChild(svg("circle", { class: "dot " + key, cx, cy, r: 2.5 }));
  }
  document.getElementById("chart").replaceChildren(chart);
}

async function refreshChart() {
  const answer = await fetch("/console/api/latency", { credentials: "same-origin" });
  if (answer.ok) drawChart(await answer.json());
}

async function placeTrial(form) {
  const error = document.getElementById("trial-error");
  const result = document.getElementById("trial-result");
  error.hidden = true;
  const data = new FormData(form);
  const body = {
    number: data.get("number"), name: data.get("name"), presentation: data.get("presentation"),
    called: data.get("called"),
    utterances: String(data.get("utterances")).split("\n").map((line) => line.trim()).filter((line) => line),
  };
  const button = form.querySelector("button");
  button.disabled = true;
  try {
    const csrf = await (await fetch("/console/api/csrf", { credentials: "same-origin" })).json();
    const answer = await fetch("/console/api/test-call", {
      method: "POST", credentials: "same-origin", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf.token },
    });
    const call = await answer.json();
    if (!answer.ok) throw new Error(call.error || answer.statusText);
    const turns = call.turns.map((turn, index) => {
      const item = document.createElement("li");
      const said = document.createElement("p");
      said.className = "said";
      said.textContent = "turn " + (index + 1) + ", caller: " + turn.said;
      item.appendChild(said);
      for (const sentence of turn.spoken) {
        const spoken = document.createElement("p");
        spoken.className = "spoken";
        spoken.textContent = "bot: " + sentence;
        item.appendChild(spoken);
      }
      return item;
    });
    document.getElementById("trial-turns").replaceChildren(...turns);
    document.getElementById("trial-sent").textContent = call.api_received;
    result.hidden = false;
  } catch (failure) {
    error.textContent = "Test call failed: " + failure.message;
    error.hidden = false;
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "calls") {
    follow(renderCalls);
    refreshChart();
    setInterval(refreshChart, 10000);
    document.getElementById("trial-form").addEventListener("submit", (event) => {
      event.preventDefault();
      placeTrial(event.target);
    });
  } else if (page === "call") {
    const uuid = decodeURIComponent(location.pathname.split("/").pop());
    let seen = null;
    renderTimeline(uuid);
    follow((table) => {
      const row = table.calls.find((call) => call.uuid === uuid);
      const now = row ? JSON.stringify(row) : null;
      if (now !== seen) { seen = now; renderTimeline(uuid); }
    });
  }
});
