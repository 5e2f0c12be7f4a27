// lmforge studio: the Runs view (table, live curves, overlay, config and command) and the Launch view (forms from the
// CLI's own flags, the exact command, start / stop / resume, the log). Plain JS over the JSON endpoints of app.py.
"use strict";

const TOKEN_KEY = "lmforge.studio.token";
const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);

// the session token comes in the URL's fragment (never sent to a server, never in a log), then lives in this
// origin's storage; every request carries it in X-Lmforge-Token
(function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    localStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

async function api(path, body) {
  const headers = { "X-Lmforge-Token": localStorage.getItem(TOKEN_KEY) || "" };
  const init = body === undefined ? { headers } : {
    method: "POST", headers: { ...headers, "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = data.error;
    throw new Error(typeof e === "string" ? e : (e && e.message) || `${r.status} ${r.statusText}`);
  }
  return data;
}

function notice(text) { $("notice").textContent = text || ""; }

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function fmtSeconds(s) {
  if (s == null) return "";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function fmtNumber(v) {
  return typeof v === "number" ? (Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(4)) : "";
}

// --- state ------------------------------------------------------------------------------------------------------
const state = {
  runs: [], overlay: new Set(), metrics: {}, detail: null, metric: "loss", pendingOut: null,
  commands: null, launchId: null, logOffset: 0,
};

// --- Runs -------------------------------------------------------------------------------------------------------
function renderRuns() {
  const body = $("runs-table").querySelector("tbody");
  const html = state.runs.map((r) => {
    const steps = r.step != null ? (r.max_steps ? `${r.step} / ${r.max_steps}` : String(r.step)) : "";
    const best = r.best ? `${r.best.metric} ${fmtNumber(r.best.value)} @${r.best.step}` : "";
    return `<tr data-id="${esc(r.id)}" class="${r.id === state.detail ? "selected" : ""}">
      <td><input type="checkbox" class="overlay" data-id="${esc(r.id)}" ${state.overlay.has(r.id) ? "checked" : ""}></td>
      <td title="${esc(r.id)}">${esc(r.id)}</td><td>${esc(r.kind)}</td>
      <td><span class="status ${esc(r.status)}" title="${esc(r.reason)}">${esc(r.status)}</span></td>
      <td title="${esc(r.model)}">${esc(r.model)}</td><td title="${esc(r.data)}">${esc(r.data)}</td>
      <td>${esc(steps)}</td><td>${esc(best)}</td><td>${fmtSeconds(r.wall_s)}</td></tr>`;
  }).join("");
  if (html === body.dataset.html) return;  // unchanged: keep the rows (and a click in progress) as they are
  body.innerHTML = body.dataset.html = html;
  body.querySelectorAll("input.overlay").forEach((box) => box.addEventListener("click", (ev) => {
    ev.stopPropagation();
    if (box.checked) state.overlay.add(box.dataset.id); else state.overlay.delete(box.dataset.id);
    refreshCurves();
  }));
  body.querySelectorAll("tr").forEach((tr) => tr.addEventListener("click", () => showDetail(tr.dataset.id)));
}

function showDetail(id) {
  state.detail = id;
  const r = state.runs.find((x) => x.id === id);
  if (!r) return;
  $("detail").hidden = false;
  $("detail-title").textContent = r.id;
  $("detail-status").textContent = `${r.kind} · ${r.status}${r.reason ? " (" + r.reason + ")" : ""}`;
  $("detail-command").textContent = r.command_line || "(not a command the studio knows)";
  const pipeline = r.kind === "data run" && r.results && r.results.steps;
  $("detail-pipeline").hidden = !pipeline;
  $("detail-config").textContent = JSON.stringify(r.results && !pipeline ? { config: r.config, results: r.results }
    : r.config, null, 2);
  if (pipeline) showPipeline(r);
  renderRuns();
}

async function showPipeline(r) {
  $("pipeline-steps").querySelector("tbody").innerHTML = r.results.steps.map((s) => {
    const reasons = Object.entries(s.reasons || {}).sort((a, b) => b[1] - a[1]).slice(0, 3)
      .map(([why, n]) => `${esc(why)} (${n})`).join("; ");
    return `<tr><td>${esc(s.step)}</td><td>${s.docs_in} → ${s.docs_out}</td><td>${s.docs_in - s.docs_out}</td>` +
      `<td>${s.chars_in} → ${s.chars_out}</td><td>${reasons}</td></tr>`;
  }).join("");
  const data = await api(`/api/runs/${encodeURI(r.id)}/rejects?limit=20`);
  $("pipeline-rejects").innerHTML = data.rejects.map((d) => `<div class="reject-doc"><b>${esc(d.step)}</b> ` +
    `${esc(d.reason)} · <code>${esc(d.id)}</code><div class="text">${esc(d.text)}</div></div>`).join("")
    || '<span class="muted">none</span>';
}

async function loadRuns() {
  const data = await api("/api/runs");
  $("workspace").textContent = data.workspace;
  state.runs = data.runs;
  if (state.pendingOut) {  // a run just launched: overlay it as soon as its directory appears
    const r = state.runs.find((x) => x.id === state.pendingOut);
    if (r) { state.overlay.add(r.id); state.pendingOut = null; }
  }
  if (!state.overlay.size && state.runs.length) {
    const first = state.runs.find((x) => x.metrics && x.metrics.length);
    if (first) state.overlay.add(first.id);
  }
  renderRuns();
}

async function refreshCurves() {
  for (const id of state.overlay) {
    const m = state.metrics[id] || (state.metrics[id] = { offset: 0, file: "", records: [] });
    try {
      const q = new URLSearchParams({ offset: m.offset, file: m.file });
      const data = await api(`/api/runs/${encodeURI(id)}/metrics?${q}`);
      if (data.reset) m.records = [];
      m.records.push(...data.records);
      m.offset = data.offset;
      m.file = data.file;
    } catch (e) { /* the run may be gone; the table says so */ }
  }
  const names = new Set();
  for (const id of state.overlay) {
    for (const rec of (state.metrics[id] || { records: [] }).records) {
      Object.keys(rec).forEach((k) => { if (k !== "step" && typeof rec[k] === "number") names.add(k); });
    }
  }
  const select = $("metric");
  const wanted = [...names].sort();
  if (select.options.length !== wanted.length || [...select.options].some((o, i) => o.value !== wanted[i])) {
    select.innerHTML = wanted.map((n) => `<option>${esc(n)}</option>`).join("");
  }
  if (wanted.includes(state.metric)) select.value = state.metric;
  else if (wanted.length) state.metric = select.value = wanted.includes("loss") ? "loss" : wanted[0];
  const series = [...state.overlay].map((id, i) => ({
    name: id, color: window.PALETTE[i % window.PALETTE.length],
    points: (state.metrics[id] || { records: [] }).records
      .filter((r) => typeof r[state.metric] === "number").map((r) => [r.step, r[state.metric]]),
  }));
  window.drawChart($("chart"), series, { logY: $("logy").checked });
  $("legend").innerHTML = series.map((s) => `<span><i style="background:${s.color}"></i>${esc(s.name)}` +
    ` (${s.points.length})</span>`).join("");
}

// --- Launch -----------------------------------------------------------------------------------------------------
async function loadCommands() {
  state.commands = (await api("/api/commands")).commands;
  $("command").innerHTML = Object.keys(state.commands).map((c) => `<option>${esc(c)}</option>`).join("");
  buildForm();
}

function buildForm() {
  const options = state.commands[$("command").value] || [];
  $("form").innerHTML = options.map((o) => {
    const id = `opt-${o.dest}`;
    const label = o.flag || o.dest;
    const dflt = o.default ? `default: ${o.default}` : "";
    let input;
    if (o.kind === "bool") {
      input = `<select id="${id}" name="${esc(o.dest)}" data-kind="bool"><option value="">(${esc(dflt || "default")})</option>` +
        `<option value="true">yes</option><option value="false">no</option></select>`;
    } else if (o.kind === "choice") {
      input = `<select id="${id}" name="${esc(o.dest)}" data-kind="choice"><option value="">(${esc(dflt || "default")})</option>` +
        o.choices.map((c) => `<option>${esc(c)}</option>`).join("") + "</select>";
    } else {
      const hint = o.kind === "list" || o.kind === "repeat" ? " (several: separate by spaces)" : "";
      input = `<input type="text" id="${id}" name="${esc(o.dest)}" data-kind="${esc(o.kind)}" placeholder="${esc(dflt + hint)}">`;
    }
    return `<div class="field"><label for="${id}" class="${o.required ? "required" : ""}">${esc(label)}</label>${input}` +
      `<div class="help">${esc(o.help)}</div></div>`;
  }).join("");
  $("form").querySelectorAll("input, select").forEach((el) => el.addEventListener("input", schedulePreview));
  schedulePreview();
}

function formValues() {
  const values = {};
  $("form").querySelectorAll("input, select").forEach((el) => {
    if (el.value === "") return;
    values[el.name] = el.dataset.kind === "bool" ? el.value === "true" : el.value;
  });
  return values;
}

let previewTimer = null;
function schedulePreview() {
  clearTimeout(previewTimer);
  previewTimer = setTimeout(preview, 150);
}

async function preview() {
  try {
    const data = await api("/api/preview", { command: $("command").value, values: formValues() });
    $("preview").textContent = data.command_line;
    $("preview").className = "";
    $("start").disabled = false;
  } catch (e) {
    $("preview").textContent = e.message;
    $("preview").className = "error";
    $("start").disabled = true;
  }
}

async function start() {
  try {
    const launch = await api("/api/launch", { command: $("command").value, values: formValues() });
    state.pendingOut = launch.out;
    selectLaunch(launch.id);
    notice("");
    await loadLaunches();
  } catch (e) { notice(e.message); }
}

function selectLaunch(id) {
  state.launchId = id;
  state.logOffset = 0;
  $("log").textContent = "";
  $("log-title").textContent = `Log of ${id}`;
}

async function loadLaunches() {
  const launches = (await api("/api/launches")).launches;
  if (!state.launchId && launches.length) selectLaunch(launches[0].id);
  const html = launches.map((l) => {
    const running = l.state === "running";
    const label = running ? (l.stop_requested ? "stopping" : "running") : `exited ${l.returncode ?? "?"}`;
    return `<div class="launch ${l.id === state.launchId ? "current" : ""}" data-id="${esc(l.id)}">
      <span class="status ${running ? "running" : l.returncode === 0 ? "finished" : "failed"}">${esc(label)}</span>
      <code>lmforge ${esc(l.command)} ${esc(l.argv.join(" "))}</code>
      ${running ? `<button class="stop" data-id="${esc(l.id)}">Stop</button>` :
        `<button class="resume secondary" data-id="${esc(l.id)}">Resume</button>`}</div>`;
  }).join("");
  if (html === $("launches").dataset.html) return;
  $("launches").innerHTML = $("launches").dataset.html = html;
  $("launches").querySelectorAll(".launch").forEach((el) => el.addEventListener("click", () => selectLaunch(el.dataset.id)));
  $("launches").querySelectorAll("button.stop").forEach((b) => b.addEventListener("click", async (ev) => {
    ev.stopPropagation();
    try { await api(`/api/launches/${b.dataset.id}/stop`, {}); await loadLaunches(); } catch (e) { notice(e.message); }
  }));
  $("launches").querySelectorAll("button.resume").forEach((b) => b.addEventListener("click", async (ev) => {
    ev.stopPropagation();
    try {
      const launch = await api(`/api/launches/${b.dataset.id}/resume`, {});
      selectLaunch(launch.id);
      await loadLaunches();
    } catch (e) { notice(e.message); }
  }));
}

async function loadLog() {
  if (!state.launchId) return;
  const data = await api(`/api/launches/${state.launchId}/log?offset=${state.logOffset}`);
  if (data.text) {
    // a progress bar redraws its line with \r: keep the last state of each line
    const log = $("log");
    const text = (log.textContent + data.text).split("\n").map((line) => line.split("\r").filter(Boolean).pop() || "").join("\n");
    log.textContent = text.slice(-200000);
    log.scrollTop = log.scrollHeight;
  }
  state.logOffset = data.offset;
  if (data.launch.state === "exited" && data.launch.returncode === 2) {
    // the CLI refused the command (a used run directory, a bad value): its one-line error, where the user looks
    const errors = $("log").textContent.split("\n").filter((l) => l.startsWith("lmforge: error:"));
    if (errors.length) notice(errors[errors.length - 1]);
  }
}

// --- Data -------------------------------------------------------------------------------------------------------
async function loadTemplates() {
  const names = (await api("/api/templates")).templates;
  $("data-template").innerHTML = names.map((n) => `<option>${esc(n)}</option>`).join("");
}

async function previewData(ev) {
  ev.preventDefault();
  const q = new URLSearchParams({ path: $("data-path").value, tokenizer: $("data-tokenizer").value,
    template: $("data-template").value, mask: $("data-mask").value, start: $("data-start").value,
    limit: $("data-limit").value });
  $("data-examples").innerHTML = "";
  $("data-rejects").innerHTML = "";
  try {
    const data = await api(`/api/data/preview?${q}`);
    $("data-summary").className = "muted";
    $("data-summary").textContent = `${data.examples.length} examples (format ${data.format}, template: ` +
      `${data.template}); highlighted: trained on`;
    $("data-examples").innerHTML = data.examples.map((e) => `<div class="example">
      <div class="head">${esc(e.where)} · ${e.tokens} tokens, ${e.trained_tokens} trained${e.truncated ? " · truncated" : ""}</div>
      <div class="text">${e.runs.map(([t, trained]) => (trained ? `<mark>${esc(t)}</mark>` : esc(t))).join("")}</div>
    </div>`).join("");
    $("data-rejects").innerHTML = data.rejects.length ? `<h3>Refused records</h3>` + data.rejects.map((r) =>
      `<div class="reject"><code>${esc(r.where)}</code> ${esc(r.reason)}</div>`).join("") : "";
  } catch (e) {
    $("data-summary").className = "error";
    $("data-summary").textContent = e.message;
  }
}

// --- Evals ------------------------------------------------------------------------------------------------------
const evals = { ids: [], task: null };

function renderEvalRuns() {
  const runs = state.runs.filter((r) => r.kind === "eval run");
  const html = runs.map((r) => `<label><input type="checkbox" class="eval-pick" data-id="${esc(r.id)}"` +
    `${evals.ids.includes(r.id) ? " checked" : ""}> ${esc(r.id)} <span class="muted">(${esc(r.model)})</span></label>`).join("")
    || '<span class="muted">no evaluation in this workspace yet</span>';
  if (html === $("eval-runs").dataset.html) return;
  $("eval-runs").innerHTML = $("eval-runs").dataset.html = html;
  $("eval-runs").querySelectorAll("input.eval-pick").forEach((box) => box.addEventListener("change", () => {
    evals.ids = [...$("eval-runs").querySelectorAll("input.eval-pick:checked")].map((b) => b.dataset.id);
    loadEvals().catch((e) => notice(e.message));
  }));
}

function evalQuery(extra = {}) {
  const q = new URLSearchParams(extra);
  evals.ids.forEach((id) => q.append("ids", id));
  return q;
}

async function loadEvals() {
  const head = $("eval-table").querySelector("thead"), body = $("eval-table").querySelector("tbody");
  if (!evals.ids.length) { head.innerHTML = body.innerHTML = ""; $("eval-items").innerHTML = ""; return; }
  const data = await api(`/api/evals?${evalQuery()}`);
  head.innerHTML = "<tr><th>task</th><th>metric</th>" + evals.ids.map((id) =>
    `<th title="${esc(data.models[id])}">${esc(id)}</th>`).join("") + "</tr>";
  body.innerHTML = data.rows.map((row) => {
    const values = evals.ids.map((id) => row.values[id] ? row.values[id].value : null);
    const best = Math.max(...values.filter((v) => v !== null));
    return `<tr><td class="task" data-task="${esc(row.task)}">${esc(row.task)}</td><td>${esc(row.metric)}</td>` +
      evals.ids.map((id) => {
        const v = row.values[id];
        if (!v) return "<td></td>";
        const err = v.stderr != null ? ` ± ${v.stderr.toFixed(4)}` : "";
        return `<td class="${values.length > 1 && v.value === best ? "best" : ""}">${v.value.toFixed(4)}${err}` +
          ` <span class="muted">n=${esc(v.n)}</span></td>`;
      }).join("") + "</tr>";
  }).join("");
  body.querySelectorAll("td.task").forEach((td) => td.addEventListener("click", () => loadEvalItems(td.dataset.task)));
}

function outcome(row) {
  // a generation task: the output (and the filtered answer); a multiple-choice one: the chosen and the gold choice
  if (row.generation !== undefined) {
    const score = Object.keys(row).find((k) => k.startsWith("exact_match") || k.startsWith("rouge"));
    const ok = score ? row[score] > 0.5 : null;
    return `<div class="${ok === null ? "" : ok ? "right" : "wrong"}">${shown(row.generation)}</div>` +
      `<div class="muted">reference: ${esc(row.reference)}${score ? ` · ${esc(score)} ${row[score]}` : ""}</div>`;
  }
  const ok = row.pred === row.gold;
  return `<div class="${ok ? "right" : "wrong"}">chose ${esc(row.choices[row.pred])}</div>` +
    `<div class="muted">gold: ${esc(row.choices[row.gold])}</div>`;
}

function itemPrompt(item) {
  // the prompt the model read (every run of a task gets the same one; older runs kept only its hash)
  const row = Object.values(item.runs).find((r) => typeof r.prompt === "string");
  return row ? `<pre class="prompt">${esc(row.prompt)}</pre>` : "";
}

async function loadEvalItems(task) {
  evals.task = task;
  const data = await api(`/api/evals/items?${evalQuery({ task, limit: 50 })}`);
  $("eval-items-title").textContent = `${task}: items side by side`;
  $("eval-items").innerHTML = data.items.map((item) => `<div class="item">
    <div class="head">data line ${esc(item.doc)}</div>${itemPrompt(item)}
    <div class="cols">${evals.ids.map((id) => `<div class="col"><div class="muted">${esc(id)}</div>` +
      (item.runs[id] ? outcome(item.runs[id]) : '<span class="muted">(not in this run)</span>') + "</div>").join("")}</div>
  </div>`).join("");
}

// --- Chat A/B ---------------------------------------------------------------------------------------------------
const chat = { a: [], b: [] };  // each side's own history: its replies are its own

async function loadCheckpoints() {
  const list = (await api("/api/checkpoints")).checkpoints;
  $("checkpoint-list").innerHTML = list.map((c) => `<option value="${esc(c.path)}">${esc(c.kind)}</option>`).join("");
}

function shown(text) {
  // a reply of only whitespace (a young model's) would be an empty box: say what it is
  if (!text) return '<span class="muted">(empty)</span>';
  return text.trim() ? esc(text) : `<span class="muted">(only whitespace: ${esc(JSON.stringify(text).slice(1, -1))})</span>`;
}

function renderSide(side) {
  $(`side-${side}`).innerHTML = chat[side].map((m) => `<div class="msg ${m.role}">${shown(m.content)}` +
    (m.meta ? `<div class="meta">${esc(m.meta)}</div>` : "") + "</div>").join("");
}

async function sendChat(ev) {
  ev.preventDefault();
  const text = $("chat-input").value.trim();
  const sides = ["a", "b"].filter((s) => $(`chat-${s}`).value.trim());
  if (!text || !sides.length) return;
  const system = $("chat-system").value.trim();
  const conversations = sides.map((s) => {
    chat[s].push({ role: "user", content: text });
    renderSide(s);
    return (system ? [{ role: "system", content: system }] : []).concat(
      chat[s].map(({ role, content }) => ({ role, content })));
  });
  $("chat-input").value = "";
  $("chat-send").disabled = true;
  $("chat-status").className = "muted";
  $("chat-status").textContent = "generating…";
  try {
    const data = await api("/api/chat", { checkpoints: sides.map((s) => $(`chat-${s}`).value.trim()), conversations,
      max_tokens: Number($("chat-max").value), temperature: Number($("chat-temp").value), seed: 0 });
    data.replies.forEach((r, i) => {
      chat[sides[i]].push({ role: "assistant", content: r.text,
        meta: `${r.completion_tokens} tokens in ${r.seconds} s (${r.finish_reason})` });
      renderSide(sides[i]);
    });
    $("chat-status").textContent = "";
  } catch (e) {
    sides.forEach((s) => { chat[s].pop(); renderSide(s); });
    $("chat-status").className = "error";
    $("chat-status").textContent = e.message;
  } finally {
    $("chat-send").disabled = false;
  }
}

// --- RAG --------------------------------------------------------------------------------------------------------
async function askRag(ev) {
  ev.preventDefault();
  $("rag-answer").textContent = "";
  $("rag-sources").innerHTML = "";
  $("rag-status").className = "muted";
  $("rag-status").textContent = "retrieving…";
  try {
    const data = await api("/api/rag", { index: $("rag-index").value, question: $("rag-question").value,
      checkpoint: $("rag-checkpoint").value, mode: $("rag-mode").value, k: Number($("rag-k").value) });
    $("rag-status").textContent = `${data.sources.length} sources` + (data.answered ? `, ${data.citations.length} cited` : "");
    $("rag-answer").textContent = data.answer || "";
    const cited = new Set(data.citations.map((c) => c.n));
    $("rag-sources").innerHTML = data.sources.map((s) => {
      const heading = Array.isArray(s.heading) ? s.heading.join(" › ") : s.heading || "";
      return `<div class="source ${cited.has(s.n) ? "cited" : ""}">
      <div class="head">[${s.n}] ${esc(s.doc_id)} [${s.start}:${s.end}]${heading ? " · " + esc(heading) : ""}</div>
      ${esc(s.text)}</div>`;
    }).join("");
  } catch (e) {
    $("rag-status").className = "error";
    $("rag-status").textContent = e.message;
  }
}

// --- wiring -----------------------------------------------------------------------------------------------------
function show(view) {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.view === view));
  document.querySelectorAll(".view").forEach((v) => { v.hidden = v.id !== `view-${view}`; });
}

document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => show(t.dataset.view)));
$("command").addEventListener("change", buildForm);
$("start").addEventListener("click", start);
$("metric").addEventListener("change", () => { state.metric = $("metric").value; refreshCurves(); });
$("logy").addEventListener("change", refreshCurves);
$("data-form").addEventListener("submit", previewData);
$("chat-send-form").addEventListener("submit", sendChat);
$("rag-form").addEventListener("submit", askRag);
$("tab-rag").addEventListener("click", () => loadCheckpoints().catch((e) => notice(e.message)));
$("chat-clear").addEventListener("click", () => { chat.a = []; chat.b = []; renderSide("a"); renderSide("b"); });
$("tab-chat").addEventListener("click", () => loadCheckpoints().catch((e) => notice(e.message)));

async function tick() {
  try {
    await loadRuns();
    renderEvalRuns();
    await refreshCurves();
    await loadLaunches();
    await loadLog();
  } catch (e) { notice(e.message); }
  setTimeout(tick, POLL_MS);
}

loadCommands().catch((e) => notice(e.message));
loadTemplates().catch((e) => notice(e.message));
tick();
window.studio = { state, show, chat };
