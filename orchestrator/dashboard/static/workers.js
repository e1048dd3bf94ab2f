// The workers page, kept current from /api/workers/events (the server reads the registry every 2 s).
"use strict";

(function () {
  function cell(text) {
    const td = document.createElement("td");
    td.textContent = text;
    return td;
  }
  function age(value) {
    return value === null || value === undefined ? "-" : `${value.toFixed(2)}s`;
  }
  const source = new EventSource("/api/workers/events");
  source.addEventListener("workers", (e) => {
    const data = JSON.parse(e.data);
    const warning = document.getElementById("queue-warning");
    warning.textContent = data.warning || "";
    warning.hidden = !data.warning;
    const body = document.getElementById("workers-body");
    body.textContent = "";
    for (const w of data.workers) {
      const tr = document.createElement("tr");
      tr.setAttribute("data-worker", w.name);
      [w.name, w.kind, w.queues.join(", "), `${w.host} / ${w.pid}`, w.concurrency, w.running.join("; ") || "-",
       age(w.heartbeat_age)].forEach((v) => tr.appendChild(cell(v)));
      body.appendChild(tr);
    }
    if (!data.workers.length) {
      const tr = document.createElement("tr");
      const td = cell("No live worker.");
      td.colSpan = 7;
      tr.appendChild(td);
      body.appendChild(tr);
    }
    const queues = document.getElementById("queues-body");
    queues.textContent = "";
    for (const q of data.queues) {
      const tr = document.createElement("tr");
      tr.setAttribute("data-queue", q.name);
      [q.name, q.lean, q.rq, q.served_by.join(", ") || "no live worker"].forEach((v) => tr.appendChild(cell(v)));
      queues.appendChild(tr);
    }
  });
})();
