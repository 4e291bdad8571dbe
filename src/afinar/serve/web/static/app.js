// afinar's dashboard: hash-routed pages over the /v1 API (the same calls any client makes).
// Written for afinar; no third-party code. Live pages poll the API once a second while a job
// is not final, so a reload or a second browser simply re-attaches to the server's state.
"use strict";

const FINAL = ["succeeded", "failed", "cancelled"];
const view = () => document.getElementById("view");
let timer = null;

// --- API --------------------------------------------------------------------------------
function key() { return sessionStorage.getItem("afinar-key") || "local"; }

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + key() }, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    document.getElementById("key-form").hidden = false;
    throw new Error("This server needs an API key: type it at the top right.");
  }
  if (!response.ok) throw new Error((body.error && body.error.message) || response.statusText);
  return body;
}

// --- live updates --------------------------------------------------------------------------------
// Server-sent events read with fetch (EventSource cannot send the API key). Falls back to
// re-rendering the page every second when the stream cannot be opened or breaks.
let live = null;  // the AbortController of the open stream

function stopLive() {
  if (live) { live.abort(); live = null; }
}

async function readEvents(response, onMessage) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", message = { event: "message", data: "", id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (message.data) onMessage(message);
        message = { event: "message", data: "", id: null };
      } else if (!line.startsWith(":")) {  // ":" starts a comment (a keep-alive)
        const at = line.indexOf(":");
        const field = at < 0 ? line : line.slice(0, at);
        const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
        if (field === "data") message.data += (message.data ? "\n" : "") + value;
        else if (field === "event") message.event = value;
        else if (field === "id") message.id = value;
      }
    }
  }
}

async function follow(path, handlers, badge) {
  stopLive();
  const controller = new AbortController();
  live = controller;
  const fallBack = () => {
    if (controller.signal.aborted) return;
    badge.textContent = "updating every second";
    badge.dataset.mode = "polling";
    timer = setTimeout(route, 1000);
  };
  try {
    const response = await fetch(path, { signal: controller.signal,
                                         headers: { Authorization: "Bearer " + key() } });
    if (!response.ok) return fallBack();
    badge.textContent = "● live";
    badge.dataset.mode = "stream";
    await readEvents(response, (m) => handlers[m.event] && handlers[m.event](JSON.parse(m.data)));
  } catch (error) {
    return fallBack();
  }
  fallBack();  // the stream ended without the page moving on (a server restart, say)
}

// --- small DOM helpers ----------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function show(...nodes) { view().replaceChildren(...nodes.filter((n) => n !== null)); }
function failure(error) { return el("p", { class: "error" }, String(error.message || error)); }
function when(seconds) { return seconds ? new Date(seconds * 1000).toLocaleString() : "–"; }

// --- jobs -------------------------------------------------------------------------------------
async function jobsPage() {
  const list = await api("/v1/fine_tuning/jobs?limit=100");
  const rows = list.data.map((job) => el("tr", { class: "job" },
    el("td", {}, el("a", { href: "#/jobs/" + job.id }, job.id)),
    el("td", {}, el("span", { class: "status " + job.status }, job.status)),
    el("td", {}, job.model), el("td", {}, job.method ? job.method.type : "supervised"),
    el("td", {}, job.fine_tuned_model || "–"), el("td", {}, when(job.created_at))));
  show(el("h1", {}, "Fine-tuning jobs"),
       rows.length ? el("table", { class: "jobs" },
         el("tr", {}, ["job", "status", "model", "method", "fine-tuned model", "created"]
           .map((h) => el("th", {}, h))), rows)
         : el("p", {}, "No jobs yet. Upload a file on the Data page, or create one with the API."));
  if (list.data.some((job) => !FINAL.includes(job.status))) timer = setTimeout(route, 2000);
}

function lossPoints(events) {
  const train = new Map(), valid = new Map();
  for (const e of events) {
    if (e.type !== "metrics" || !e.data) continue;
    if (typeof e.data.train_loss === "number") train.set(e.data.step, e.data.train_loss);
    if (typeof e.data.valid_loss === "number") valid.set(e.data.step, e.data.valid_loss);
  }
  const sorted = (m) => [...m.entries()].sort((a, b) => a[0] - b[0]);
  return { train: sorted(train), valid: sorted(valid) };
}

// Line charts in inline SVG. `series`: [{cls, points: [[step, loss]...], dots}], each drawn
// with the CSS class `cls` (colours live in app.css).
function lineChart(series, logScale) {
  const ns = "http://www.w3.org/2000/svg";
  const W = 720, H = 260, pad = 44;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  const all = series.flatMap((s) => s.points);
  const label = (x, y, content, anchor = "start") => {
    const text = document.createElementNS(ns, "text");
    text.setAttribute("x", x); text.setAttribute("y", y);
    text.setAttribute("text-anchor", anchor);
    text.textContent = content;
    svg.append(text);
  };
  if (!all.length) {
    label(W / 2, H / 2, "waiting for the first step…", "middle");
    return svg;
  }
  const f = (y) => (logScale ? Math.log10(Math.max(y, 1e-6)) : y);
  const xs = all.map((p) => p[0]), ys = all.map((p) => f(p[1]));
  const x0 = Math.min(...xs, 0), x1 = Math.max(...xs, 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => pad + (x - x0) / (x1 - x0) * (W - 2 * pad);
  const sy = (y) => H - pad + (f(y) - y0) / (y1 - y0) * (2 * pad - H);
  for (const [value, yy] of [[y1, pad], [y0, H - pad]]) {
    label(4, yy + 4, (logScale ? Math.pow(10, value) : value).toFixed(3));
  }
  label(pad, H - pad + 16, `step ${x0}`);
  label(W - pad, H - pad + 16, `step ${x1}`, "end");
  for (const s of series) {
    if (!s.points.length) continue;
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("class", s.cls);
    line.setAttribute("points", s.points.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "));
    svg.append(line);
    for (const [x, y] of s.dots === false ? [] : s.points) {
      const dot = document.createElementNS(ns, "circle");
      dot.setAttribute("class", s.cls);
      dot.setAttribute("cx", sx(x)); dot.setAttribute("cy", sy(y)); dot.setAttribute("r", 2.5);
      svg.append(dot);
    }
  }
  return svg;
}

function chart(points, logScale) {
  return lineChart([{ cls: "train", points: points.train }, { cls: "valid", points: points.valid }],
                   logScale);
}

function logScaleToggle() {
  const toggle = el("label", {}, el("input", { type: "checkbox", id: "log-scale" }), " log scale");
  toggle.firstChild.checked = sessionStorage.getItem("afinar-log-scale") === "1";
  toggle.firstChild.addEventListener("change", (e) => {
    sessionStorage.setItem("afinar-log-scale", e.target.checked ? "1" : "0");
    route();
  });
  return toggle;
}

function checkpointList(checkpoints) {
  return checkpoints.length ? el("ul", { class: "checkpoints" }, checkpoints.map((c) =>
    el("li", { class: "checkpoint" }, `step ${c.step_number}: `,
       el("a", { href: "#/playground/" + encodeURIComponent(c.fine_tuned_model_checkpoint) },
          c.fine_tuned_model_checkpoint),
       typeof c.metrics.train_loss === "number"
         ? ` (training loss ${c.metrics.train_loss.toFixed(4)})` : "")))
    : el("p", {}, "none yet");
}

function eventItem(e) {
  return el("li", { class: e.level }, el("time", {}, when(e.created_at)), " ", e.message);
}

async function jobPage(id) {
  const [job, events, checkpoints, config] = await Promise.all([
    api("/v1/fine_tuning/jobs/" + id),
    api(`/v1/fine_tuning/jobs/${id}/events?limit=1000`),
    api(`/v1/fine_tuning/jobs/${id}/checkpoints?limit=100`),
    api(`/v1/fine_tuning/jobs/${id}/config`).catch(() => null)]);
  const logScale = sessionStorage.getItem("afinar-log-scale") === "1";
  const act = (what) => async () => {
    try { await api(`/v1/fine_tuning/jobs/${id}/${what}`, { method: "POST" }); }
    catch (error) { alert(error.message); }
    route();
  };
  const buttons = [];
  if (job.status === "running") buttons.push(el("button", { id: "pause", onclick: act("pause") }, "Pause"));
  if (job.status === "paused") buttons.push(el("button", { id: "resume", onclick: act("resume") }, "Resume"));
  if (!FINAL.includes(job.status)) buttons.push(el("button", { id: "cancel", onclick: act("cancel") }, "Cancel"));
  const all = events.data;  // newest first, as the API lists them
  const chartBox = el("div", {}, chart(lossPoints(all), logScale));
  const checkpointBox = el("div", {}, checkpointList(checkpoints.data));
  const eventList = el("ol", { class: "events" }, all.map(eventItem));
  const mode = el("small", { id: "live", class: "live" });
  show(el("h1", {}, "Job ", el("code", {}, job.id)),
       el("p", {}, el("span", { class: "status " + job.status, id: "job-status" }, job.status),
          ` · ${job.model} · ${job.method ? job.method.type : "supervised"}`,
          job.fine_tuned_model ? ` · ${job.fine_tuned_model}` : "", " ", mode),
       job.error ? el("p", { class: "error" }, job.error.message) : null,
       el("div", { class: "actions" }, buttons),
       el("h2", {}, "Loss"), logScaleToggle(),
       el("p", { class: "legend" }, el("span", { class: "train" }, "— training"), "  ",
          el("span", { class: "valid" }, "— held-out")),
       chartBox,
       el("h2", {}, "Checkpoints"), checkpointBox,
       el("h2", {}, "Events"), eventList,
       config && config.config ? el("details", { id: "job-config" }, el("summary", {}, "Frozen config (the run's config.yaml)"),
                   el("pre", { class: "config" }, config.config)) : null);
  if (FINAL.includes(job.status)) return;
  // Live: new events arrive over the server-sent event stream; a chart redraw is throttled.
  let drawn = 0, checkpointsAt = Date.now();
  const redraw = () => {
    drawn = 0;
    chartBox.replaceChildren(chart(lossPoints(all), logScale));
  };
  follow(`/v1/fine_tuning/jobs/${id}/events/stream` + (all.length ? "?after=" + all[0].id : ""), {
    event: (e) => {
      all.unshift(e);
      eventList.prepend(eventItem(e));
      if (!drawn) drawn = setTimeout(redraw, 200);
      if (Date.now() - checkpointsAt > 3000) {
        checkpointsAt = Date.now();
        api(`/v1/fine_tuning/jobs/${id}/checkpoints?limit=100`)
          .then((c) => checkpointBox.replaceChildren(checkpointList(c.data))).catch(() => {});
      }
    },
    job: (j) => { if (j.status !== job.status) route(); },
  }, mode);
}

// --- data ---------------------------------------------------------------------------------------
function bubbles(example) {
  const turns = example.messages.map((m) => el("div", { class: "bubble " + m.role },
    el("b", {}, m.role), el("div", {}, m.content)));
  if (example.rejected !== null && example.rejected !== undefined) {
    turns.push(el("div", { class: "bubble rejected" }, el("b", {}, "rejected"),
                  el("div", {}, example.rejected)));
  }
  return el("div", { class: "example" }, el("small", {}, "line " + example.line), turns);
}

async function validate(file) {
  const status = document.getElementById("upload-status");
  status.replaceChildren(`uploading ${file.name}…`);
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file);
  try {
    const uploaded = await api("/v1/files", { method: "POST", body: form });
    const model = document.getElementById("token-model").value;
    const report = await api(`/v1/files/${uploaded.id}/validation` +
                             (model ? "?model=" + encodeURIComponent(model) : ""));
    const t = report.tokens;
    const lines = (groups) => groups.slice(0, 5).map((g) => g.join(", ")).join("; ") +
      (groups.length > 5 ? "; …" : "");
    const verdict = report.ok ? "usable" : "not usable";
    status.replaceChildren(el("p", { class: report.ok ? "ok" : "error", id: "verdict" },
      `${file.name} (${uploaded.id}): ${report.examples} examples, format ${report.format}, ` +
      `${report.errors} errors, ${report.warnings} warnings: ${verdict}`),
      el("ul", { class: "issues" }, report.issues.map((i) => el("li", { class: "issue " + i.severity },
        `${i.line ? "line " + i.line : "file"}: ${i.field ? i.field + ": " : ""}${i.message}` +
        (i.hint ? ` (${i.hint})` : "")))),
      t ? el("p", { id: "token-stats" }, `tokens per example (${t.model}): min ${t.tokens_min}, ` +
        `median ${t.tokens_median}, p95 ${t.tokens_p95}, max ${t.tokens_max} (total ` +
        `${t.tokens_total}); trained tokens ${Math.round(100 * t.supervised_share)}%; longer ` +
        `than ${t.max_seq_length}: ${t.over_max_seq_length}`) : null,
      report.duplicate_groups ? el("p", { id: "duplicates" },
        `exact duplicates: ${report.duplicate_groups.length}` +
        (report.duplicate_groups.length ? ` (lines ${lines(report.duplicate_groups)})` : "") +
        `; contradictions (same prompt, different answers): ` +
        `${report.contradiction_groups.length}` + (report.contradiction_groups.length
          ? ` (lines ${lines(report.contradiction_groups)})` : "")) : null,
      (report.advice || []).map((a) => el("p", { class: "advice" }, "Advice: " + a)),
      report.split ? el("p", {}, `held out by a job: ${report.split.held_out} of ` +
        `${report.split.train + report.split.held_out} (${report.split.method})`) : null,
      el("div", { class: "examples" }, report.sample.map(bubbles)));
  } catch (error) {
    status.replaceChildren(failure(error));
  }
}

async function dataPage() {
  const models = await api("/v1/models");
  const tokenModel = el("select", { id: "token-model" },
    models.data.filter((m) => !m.id.startsWith("ft:"))
      .map((m) => el("option", { value: m.id }, m.id)),
    el("option", { value: "" }, "(no token counts)"));
  const input = el("input", { type: "file", id: "file", accept: ".jsonl,.json,.txt" });
  input.addEventListener("change", () => input.files[0] && validate(input.files[0]));
  const zone = el("div", { class: "drop", id: "drop" }, "Drop a JSONL file here, or ", input);
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files[0]) validate(e.dataTransfer.files[0]);
  });
  show(el("h1", {}, "Data"),
       el("p", {}, "The file is uploaded (purpose fine-tune) and checked as `afinar validate` " +
          "checks it: every problem with its line and field."),
       el("p", {}, el("label", {}, "count tokens with ", tokenModel)),
       zone, el("div", { id: "upload-status" }));
}

// --- new job ---------------------------------------------------------------------------------------
const METHOD_PARAMS = { supervised: [], dpo: ["beta"], orpo: ["lambda"] };

function jobRequest(form) {
  const method = form.method.value;
  const hyper = {};
  for (const name of ["n_epochs", "batch_size", "learning_rate_multiplier",
                      ...METHOD_PARAMS[method]]) {
    const value = form[name].value.trim();
    if (value && value !== "auto") hyper[name] = Number(value);
  }
  const body = { model: form.model.value, training_file: form.training_file.value,
                 method: { type: method, [method]: { hyperparameters: hyper } } };
  if (form.suffix.value.trim()) body.suffix = form.suffix.value.trim();
  const settings = advancedValues(form);
  if (Object.keys(settings).length) body.settings = settings;
  return body;
}

// The Advanced part: every training setting a job may set (afinar's `settings` extension),
// as the typed config describes it. Only the ones given a value are sent.
function advancedPart(items) {
  const rows = items.map((item) => {
    const input = item.choices
      ? el("select", { "data-setting": item.name },
           el("option", { value: "" }, `default (${JSON.stringify(item.default)})`),
           item.choices.map((c) => el("option", { value: JSON.stringify(c) }, String(c))))
      : el("input", { "data-setting": item.name, size: 14,
                      placeholder: item.default === null ? "none" : JSON.stringify(item.default) });
    return el("tr", { class: "setting" }, el("td", {}, el("code", {}, item.name)),
              el("td", {}, input), el("td", { class: "help" }, item.description));
  });
  return el("details", { id: "advanced" },
    el("summary", {}, `Advanced: every training setting (${items.length})`),
    el("p", { class: "help" }, "Empty means the default. Numbers, true/false and JSON lists " +
       "are read as such; the server checks every value when the job is created."),
    el("table", { class: "settings" }, rows));
}

function advancedValues(form) {
  const out = {};
  for (const input of form.querySelectorAll("[data-setting]")) {
    const text = input.value.trim();
    if (!text) continue;
    let value = text;
    try { value = JSON.parse(text); } catch (error) { /* plain text, e.g. cosine */ }
    out[input.dataset.setting] = value;
  }
  return out;
}

function equivalents(body) {
  const json = JSON.stringify(body, null, 2);
  const { settings, ...openai } = body;  // settings go in extra_body: the SDK has no such field
  const python = "from openai import OpenAI\n" +
    `client = OpenAI(base_url="${location.origin}/v1", api_key="YOUR_KEY")\n` +
    `job = client.fine_tuning.jobs.create(**${JSON.stringify(openai, null, 4)}` +
    (settings ? `,\n    extra_body={"settings": ${JSON.stringify(settings)}})` : ")");
  const curl = `curl ${location.origin}/v1/fine_tuning/jobs -H "Authorization: Bearer YOUR_KEY" ` +
    `-H "Content-Type: application/json" -d '${JSON.stringify(body)}'`;
  const h = body.method[body.method.type].hyperparameters;
  const cli = ["afinar train --data FILE.jsonl --model " + body.model,
               body.method.type === "supervised" ? "" : "--method " + body.method.type,
               h.n_epochs ? "--epochs " + h.n_epochs : "",
               h.batch_size ? "--set batch_size=" + h.batch_size : "",
               h.learning_rate_multiplier ? "--set learning_rate_multiplier=" +
                 h.learning_rate_multiplier : "",
               h.beta ? "--set dpo.beta=" + h.beta : "",
               h.lambda ? "--set orpo.lambda=" + h.lambda : "",
               ...Object.entries(settings || {}).map(([name, value]) =>
                 `--set ${name}=${typeof value === "string" ? value : JSON.stringify(value)}`)]
    .filter(Boolean).join(" ");
  return { curl, python, cli, json };
}

async function newJobPage() {
  const [files, models, help] = await Promise.all([
    api("/v1/files?purpose=fine-tune"), api("/v1/models"),
    api("/v1/fine_tuning/jobs/settings")]);
  const field = (name, input) => {
    const info = help.hyperparameters[name];
    return el("p", { class: "field", "data-for": name }, el("label", {}, name + " ", input),
              el("small", { class: "help" }, info ? `${info.description} ` +
                `(${info.low}–${info.high}, or auto)` : ""));
  };
  const number = (name) => el("input", { name, id: "job-" + name, placeholder: "auto",
                                         size: 8 });
  const form = el("form", { id: "new-job" },
    el("p", {}, el("label", {}, "training file ", el("select", { name: "training_file" },
      files.data.map((f) => el("option", { value: f.id }, `${f.filename} (${f.id})`))))),
    el("p", {}, el("label", {}, "start from ", el("select", { name: "model" },
      models.data.map((m) => el("option", { value: m.id }, m.id))))),
    el("p", {}, el("label", {}, "method ", el("select", { name: "method", id: "job-method" },
      ["supervised", "dpo", "orpo"].map((m) => el("option", { value: m }, m)))),
      el("small", { class: "help" }, " " + help.method)),
    field("n_epochs", number("n_epochs")), field("batch_size", number("batch_size")),
    field("learning_rate_multiplier", number("learning_rate_multiplier")),
    field("beta", number("beta")), field("lambda", number("lambda")),
    el("p", {}, el("label", {}, "suffix ", el("input", { name: "suffix", size: 16 }))),
    advancedPart(help.settings),
    el("p", {}, el("button", { type: "submit", id: "create" }, "Create job")));
  const code = el("pre", { id: "equivalent" });
  const refresh = () => {
    const method = form.method.value;
    for (const name of ["beta", "lambda"]) {
      form.querySelector(`[data-for=${name}]`).hidden = !METHOD_PARAMS[method].includes(name);
    }
    const e = equivalents(jobRequest(form));
    code.textContent = `# CLI\n${e.cli}\n\n# Python (openai)\n${e.python}\n\n# curl\n${e.curl}`;
  };
  form.addEventListener("input", refresh);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const job = await api("/v1/fine_tuning/jobs", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(jobRequest(form)) });
      location.hash = "#/jobs/" + job.id;
    } catch (error) {
      form.append(failure(error));
    }
  });
  show(el("h1", {}, "New fine-tuning job"),
       files.data.length ? form : el("p", {}, "Upload a training file on the Data page first."),
       files.data.length ? el("h2", {}, "The same job from code") : null,
       files.data.length ? code : null);
  if (files.data.length) refresh();
}

// --- playground ---------------------------------------------------------------------------------
async function streamAnswer(model, messages, settings, out) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { Authorization: "Bearer " + key(), "Content-Type": "application/json" },
    body: JSON.stringify(Object.assign({ model, messages, stream: true }, settings)) });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error((body.error && body.error.message) || response.statusText);
  }
  await readEvents(response, (m) => {
    if (m.data === "[DONE]") return;
    const chunk = JSON.parse(m.data);
    const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
    if (delta && delta.content) out.append(delta.content);
  });
}

async function playgroundPage(preselected) {
  const list = await api("/v1/models");
  const ids = list.data.map((m) => m.id);
  if (preselected && !ids.includes(preselected)) ids.push(preselected);  // a checkpoint
  const picks = ids.map((id) => el("label", { class: "pick" },
    el("input", { type: "checkbox", value: id, name: "model" }), " ", id));
  picks.forEach((label, i) => {
    const box = label.firstChild;
    box.checked = preselected ? box.value === preselected || i === 0 : i < 2;
  });
  const system = el("textarea", { id: "system", rows: 2, placeholder: "system prompt (optional)" });
  const prompt = el("textarea", { id: "prompt", rows: 3, placeholder: "your message" });
  const temperature = el("input", { id: "temperature", type: "number", min: 0, max: 2, step: 0.1,
                                    value: 0 });
  const maxTokens = el("input", { id: "max-tokens", type: "number", min: 1, max: 2048,
                                  value: 128 });
  const columns = el("div", { class: "columns", id: "columns" });
  const run = el("button", { id: "run" }, "Run");
  run.addEventListener("click", async () => {
    const chosen = picks.map((p) => p.firstChild).filter((b) => b.checked).map((b) => b.value);
    const messages = (system.value.trim() ? [{ role: "system", content: system.value }] : [])
      .concat([{ role: "user", content: prompt.value }]);
    const settings = { temperature: Number(temperature.value),
                       max_tokens: Number(maxTokens.value) };
    columns.replaceChildren(...chosen.map((model) => el("div", { class: "column" },
      el("h3", {}, model), el("div", { class: "answer" }))));
    run.disabled = true;
    await Promise.all(chosen.map((model, i) => {
      const out = columns.children[i].querySelector(".answer");
      return streamAnswer(model, messages, settings, out)
        .catch((error) => out.replaceChildren(failure(error)));
    }));
    run.disabled = false;
  });
  show(el("h1", {}, "Playground"),
       el("p", {}, "One prompt, answered by each chosen model side by side, streamed."),
       el("div", { class: "picks" }, picks), system, prompt,
       el("p", {}, el("label", {}, "temperature ", temperature), "  ",
          el("label", {}, "max tokens ", maxTokens), "  ", run),
       columns);
}

// --- routing --------------------------------------------------------------------------------------
// Each page is a function of the route's id; pages in other files (models.js, compare.js,
// rate.js) add themselves to PAGES when they load.
const PAGES = {
  data: () => dataPage(),
  new: () => newJobPage(),
  playground: (id) => playgroundPage(id),
  jobs: (id) => (id ? jobPage(id) : jobsPage()),
};

async function route() {
  clearTimeout(timer);
  stopLive();
  const hash = location.hash || "#/jobs";
  const [, page, ...rest] = hash.split("/");
  const id = rest.length ? decodeURIComponent(rest.join("/")) : null;
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", link.dataset.nav === page);
  }
  try {
    await (PAGES[page] || PAGES.jobs)(id);
  } catch (error) {
    show(failure(error));
  }
}

document.getElementById("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("afinar-key", document.getElementById("key").value.trim());
  document.getElementById("key-form").hidden = true;
  route();
});
window.addEventListener("hashchange", route);
// Deferred scripts (the other pages) have all run before DOMContentLoaded.
document.addEventListener("DOMContentLoaded", route);
