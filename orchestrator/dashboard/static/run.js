// The run page: the DAG (laid out by the vendored dagre), a virtualised grid of every task,
// and live updates from the server's event stream (/api/runs/{id}/events), which sends only
// the tasks whose record changed. Every task node and grid row carries data-task and
// data-state, kept current.
"use strict";

function orchRunPage(runId) {
  const STATES = ["pending", "queued", "running", "retrying", "success", "failure", "cancelled", "skipped"];
  const ROW = 26;
  const enc = encodeURIComponent;
  let rows = [];          // [name, state, attempts, worker, started_at, finished_at, error]
  let nodeOf = [];        // row index -> graph node index
  let position = new Map();  // task name -> row index
  let nodes = [];         // graph nodes from the server
  let nodeEls = [];       // their <g> elements
  let shown = [];         // row indexes that pass the grid's filter
  let source = null;
  let marker = null;      // what the data was read at: the event stream catches up from there

  const grid = document.getElementById("grid");
  const spacer = document.getElementById("grid-spacer");
  const filter = document.getElementById("grid-filter");

  function load() {
    return fetch(`/api/runs/${enc(runId)}`, {credentials: "same-origin"})
      .then((r) => r.json())
      .then((data) => {
        rows = data.rows;
        marker = data.marker;
        nodeOf = data.node_of;
        position = new Map(rows.map((row, i) => [row[0], i]));
        nodes = data.graph.nodes;
        countAll();
        drawGraph(data.graph);
        applyFilter();
        setHeader(data.header);
      });
  }

  // ----------------------------------------------------------------- graph
  function nodeState(index) {
    const node = nodes[index];
    if (node.task !== null && position.has(node.task)) return rows[position.get(node.task)][1];
    const counts = nodeCounts(index);
    for (const s of ["failure", "running", "retrying", "queued", "cancelled", "pending"]) if (counts[s]) return s;
    if (counts.success) return "success";
    return counts.skipped ? "skipped" : "pending";
  }

  let counted = [];  // node index -> {state: tasks it shows in that state, besides its own task}
  function countAll() {
    counted = nodes.map(() => ({}));
    rows.forEach((row, i) => count(i, row[1], 1));
  }

  function count(i, state, by) {
    const n = nodeOf[i];
    if (n < 0 || nodes[n].task === rows[i][0]) return;
    counted[n][state] = (counted[n][state] || 0) + by;
  }

  function nodeCounts(index) {
    return counted[index];
  }

  function countsText(counts) {
    return STATES.filter((s) => counts[s]).map((s) => `${s} ${counts[s]}`).join(", ");
  }

  function drawGraph(graph) {
    const box = document.getElementById("graph");
    box.textContent = "";
    document.getElementById("graph-note").textContent = graph.collapsed
      ? `(${rows.length} tasks: layers drawn as groups; the grid lists every task)` : "";
    const g = new dagre.graphlib.Graph();
    g.setGraph({rankdir: "LR", nodesep: 12, ranksep: 40, marginx: 10, marginy: 10});
    g.setDefaultEdgeLabel(() => ({}));
    graph.nodes.forEach((node, i) => {
      const lines = node.kind === "task" ? 1 : 2;
      const chars = node.kind === "task" ? node.label.length : Math.max(node.label.length, 30);
      g.setNode(String(i), {width: Math.min(280, 16 + 7 * chars), height: 14 + 15 * lines});
    });
    graph.edges.forEach(([a, b]) => g.setEdge(String(a), String(b)));
    dagre.layout(g);
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    const size = g.graph();
    svg.setAttribute("width", Math.max(size.width || 0, 100));
    svg.setAttribute("height", Math.max(size.height || 0, 40));
    svg.innerHTML = '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" ' +
      'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#9ca3af"/></marker></defs>';
    g.edges().forEach((e) => {
      const path = document.createElementNS(NS, "path");
      const pts = g.edge(e).points;
      path.setAttribute("d", "M" + pts.map((p) => `${p.x},${p.y}`).join(" L"));
      path.setAttribute("class", "edge");
      path.setAttribute("marker-end", "url(#arrow)");
      svg.appendChild(path);
    });
    nodeEls = graph.nodes.map((node, i) => {
      const at = g.node(String(i));
      const el = document.createElementNS(NS, "g");
      el.setAttribute("transform", `translate(${at.x - at.width / 2},${at.y - at.height / 2})`);
      if (node.task !== null) el.setAttribute("data-task", node.task);
      else el.setAttribute("data-group", node.label);
      el.setAttribute("data-kind", node.kind);
      const rect = document.createElementNS(NS, "rect");
      rect.setAttribute("width", at.width);
      rect.setAttribute("height", at.height);
      el.appendChild(rect);
      const title = document.createElementNS(NS, "text");
      title.setAttribute("x", 8);
      title.setAttribute("y", 18);
      title.textContent = node.label.length > 36 ? node.label.slice(0, 35) + "…" : node.label;
      el.appendChild(title);
      if (node.kind !== "task") {
        const sub = document.createElementNS(NS, "text");
        sub.setAttribute("x", 8);
        sub.setAttribute("y", 33);
        sub.setAttribute("class", "counts");
        el.appendChild(sub);
      }
      const tip = document.createElementNS(NS, "title");
      el.appendChild(tip);
      el.addEventListener("click", () => {
        if (node.task !== null) location.href = `/runs/${enc(runId)}/tasks/${enc(node.task)}`;
        else { filter.value = ""; grid.scrollIntoView(); }
      });
      svg.appendChild(el);
      return el;
    });
    box.appendChild(svg);
    nodeEls.forEach((_, i) => paintNode(i));
  }

  function paintNode(index) {
    const el = nodeEls[index];
    if (!el) return;
    const node = nodes[index];
    const state = nodeState(index);
    el.setAttribute("data-state", state);
    el.setAttribute("class", `node ${node.kind} state-${state}`);
    let text = `${node.label}: ${state}`;
    if (node.kind !== "task") {
      const counts = countsText(nodeCounts(index));
      el.querySelector("text.counts").textContent = counts || (node.kind === "map" ? "no children yet" : "");
      text += counts ? ` (${counts})` : "";
    }
    el.querySelector("title").textContent = text;
  }

  // ----------------------------------------------------------------- grid
  function applyFilter() {
    const words = filter.value.trim().toLowerCase();
    shown = [];
    for (let i = 0; i < rows.length; i++) {
      if (!words || rows[i][0].toLowerCase().includes(words) || rows[i][1] === words) shown.push(i);
    }
    spacer.style.height = `${shown.length * ROW}px`;
    grid.style.height = `${Math.max(3 * ROW, Math.min(shown.length * ROW + 2, window.innerHeight * 0.6))}px`;
    document.getElementById("grid-count").textContent =
      shown.length === rows.length ? `(${rows.length})` : `(${shown.length} of ${rows.length})`;
    renderGrid(true);
  }

  function fmtDate(t) {
    if (!t) return "-";
    const d = new Date(t * 1000);
    const two = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ` +
      `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
  }

  function fmtTime(t) {
    if (!t) return "-";
    const d = new Date(t * 1000);
    return d.toLocaleTimeString([], {hour12: false}) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }

  function fmtDuration(row) {
    const start = row[4];
    const end = row[5] || (row[1] === "running" ? Date.now() / 1000 : null);
    if (!start || !end) return "-";
    const s = Math.max(0, end - start);
    return s < 60 ? `${s.toFixed(2)}s` : `${Math.floor(s / 60)}m${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  }

  function fillRow(el, i) {
    const row = rows[i];
    el.setAttribute("data-task", row[0]);
    el.setAttribute("data-state", row[1]);
    el.dataset.index = i;
    const cells = el.children;
    cells[0].textContent = row[0];
    cells[0].title = row[0];
    cells[1].innerHTML = "";
    const pill = document.createElement("span");
    pill.className = `pill state-${row[1]}`;
    pill.textContent = row[1];
    cells[1].appendChild(pill);
    cells[2].textContent = row[2];
    cells[3].textContent = row[3] || "-";
    cells[4].textContent = fmtTime(row[4]);
    cells[5].textContent = fmtDuration(row);
    cells[6].textContent = row[6] || "";
    cells[6].title = row[6] || "";
  }

  let drawn = new Map();  // row index -> element
  function renderGrid(all) {
    const first = Math.max(0, Math.floor(grid.scrollTop / ROW) - 10);
    const last = Math.min(shown.length, Math.ceil((grid.scrollTop + grid.clientHeight) / ROW) + 10);
    const wanted = new Map();
    for (let k = first; k < last; k++) wanted.set(shown[k], k);
    for (const [i, el] of drawn) {
      if (!wanted.has(i) || all) { el.remove(); drawn.delete(i); }
    }
    for (const [i, k] of wanted) {
      if (drawn.has(i)) continue;
      const el = document.createElement("div");
      el.className = "row";
      for (let c = 0; c < 7; c++) el.appendChild(document.createElement("span"));
      el.style.top = `${k * ROW}px`;
      el.addEventListener("click", () => { location.href = `/runs/${enc(runId)}/tasks/${enc(rows[i][0])}`; });
      fillRow(el, i);
      grid.appendChild(el);
      drawn.set(i, el);
    }
  }

  grid.addEventListener("scroll", () => renderGrid(false));
  filter.addEventListener("input", applyFilter);

  // ----------------------------------------------------------------- live
  function setHeader(h) {
    const section = document.getElementById("run-header");
    section.setAttribute("data-state", h.state);
    const pill = document.getElementById("run-state");
    pill.textContent = h.state;
    pill.className = `pill state-${h.state}`;
    document.getElementById("run-finished").textContent = fmtDate(h.finished_at);
    document.getElementById("run-retries").textContent = h.retries;
    document.getElementById("run-cancelled").textContent = h.cancelled_by || "-";
    const warning = document.getElementById("run-warning");
    warning.textContent = h.warning || "";
    warning.hidden = !(h.warning && h.state === "running");
    const cancel = document.getElementById("cancel-run");
    const retry = document.getElementById("retry-run");
    if (window.ORCH.writable) {
      cancel.disabled = h.state !== "running";
      retry.disabled = !(h.state === "failure" || h.state === "cancelled");
    }
  }

  function applyRows(changed) {
    const touched = new Set();
    for (const row of changed) {
      const i = position.get(row[0]);
      if (i === undefined) continue;
      count(i, rows[i][1], -1);
      rows[i] = row;
      count(i, row[1], 1);
      touched.add(nodeOf[i]);
      const el = drawn.get(i);
      if (el) fillRow(el, i);
    }
    touched.forEach((n) => { if (n >= 0) paintNode(n); });
  }

  function connect() {
    source = new EventSource(`/api/runs/${enc(runId)}/events?since=${enc(marker)}`);
    source.addEventListener("tasks", (e) => applyRows(JSON.parse(e.data)));
    source.addEventListener("header", (e) => setHeader(JSON.parse(e.data)));
    source.addEventListener("reload", () => { load(); });
    source.addEventListener("gone", () => {
      source.close();
      document.getElementById("run-warning").textContent = "this run is gone from Redis (its retention ended)";
      document.getElementById("run-warning").hidden = false;
    });
  }

  // Durations of running tasks grow without any event: repaint the drawn rows once a second.
  setInterval(() => { for (const [i, el] of drawn) if (rows[i][1] === "running") fillRow(el, i); }, 1000);

  load().then(connect);
}
