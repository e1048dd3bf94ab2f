// The task page: the log of one attempt, shown from its end (earlier lines on demand), and
// followed live (/api/runs/{id}/log/events) while the task has not finished.
"use strict";

function orchTaskPage(runId, task, latest, state) {
  const enc = encodeURIComponent;
  const logEl = document.getElementById("log");
  const earlier = document.getElementById("log-earlier");
  const status = document.getElementById("log-status");
  const asked = parseInt(new URLSearchParams(location.search).get("attempt") || "0", 10);
  const finished = ["success", "failure", "cancelled", "skipped"].includes(state);
  // A task waiting for its next attempt (pending, retrying) is followed from that attempt on.
  const waiting = state === "pending" || state === "retrying";
  const attempt = asked || (waiting ? latest + 1 : latest);
  let first = null;
  let last = null;
  let seen = null;  // the task's record as the event stream last sent it

  function lineText(line) {
    const d = new Date(line[1] * 1000);
    const stamp = d.toLocaleTimeString([], {hour12: false}) + "." + String(d.getMilliseconds()).padStart(3, "0");
    return `${stamp} ${line[2]}\n`;
  }

  function url(extra) {
    return `/api/runs/${enc(runId)}/log?task=${enc(task)}&attempt=${attempt}${extra}`;
  }

  function showPage(page, atStart) {
    const text = page.lines.map(lineText).join("");
    if (atStart) logEl.insertBefore(document.createTextNode(text), logEl.firstChild);
    else logEl.appendChild(document.createTextNode(text));
    if (page.first !== null && (first === null || page.first < first)) first = page.first;
    if (page.last !== null && (last === null || page.last > last)) last = page.last;
    earlier.hidden = !page.more_before;
  }

  document.getElementById("log-attempt").textContent = attempt ? `(attempt ${attempt})` : "";
  earlier.addEventListener("click", () => {
    earlier.disabled = true;  // one page at a time: the next starts where this one ends
    fetch(url(`&before=${first}`), {credentials: "same-origin"}).then((r) => r.json())
      .then((page) => { showPage(page, true); })
      .finally(() => { earlier.disabled = false; });
  });

  function follow() {
    const source = new EventSource(`/api/runs/${enc(runId)}/log/events?task=${enc(task)}&attempt=${attempt}&after=${last || 0}`);
    status.textContent = "following…";
    source.addEventListener("lines", (e) => {
      const page = JSON.parse(e.data);
      page.more_before = !earlier.hidden;
      showPage(page, false);
      logEl.scrollTop = logEl.scrollHeight;
    });
    source.addEventListener("task", (e) => {
      const record = JSON.parse(e.data);
      seen = record;
      const box = document.getElementById("task");
      box.setAttribute("data-state", record.state);
      const pill = document.getElementById("task-state");
      pill.textContent = record.state;
      pill.className = `pill state-${record.state}`;
    });
    source.addEventListener("end", () => {
      source.close();
      status.textContent = "attempt over";
      // Show what the attempt ended with (its row, its traceback), once something did change.
      if (seen && (seen.state !== state || (seen.attempt || 0) !== latest)) setTimeout(() => location.reload(), 300);
    });
  }

  if (!attempt) {
    status.textContent = "not started yet";
  }
  if (attempt && (asked || !waiting)) {
    fetch(url(""), {credentials: "same-origin"}).then((r) => r.json()).then((page) => {
      showPage(page, false);
      if (!page.lines.length) status.textContent = "no output";
      logEl.scrollTop = logEl.scrollHeight;
      if (!finished && !asked) follow();
    });
  } else if (!finished && !asked) {
    follow();
  }
}
