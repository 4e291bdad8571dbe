// afinar dashboard: the Rate page (blind A/B rating). Loaded after app.js, whose helpers it uses.
// Two models answer the same prompt; the answers are shown as "Answer 1" / "Answer 2" on sides
// drawn at random, and the names appear only after the vote, so the rater judges the text and
// not the model. Votes live in the server's database (/v1/ratings) and export as preference
// pairs a DPO job trains on.
"use strict";

// The page's state; the key handler acts only while the Rate page is shown.
let rateState = null;

const RATE_KEYS = { a: "left", 1: "left", b: "right", 2: "right", t: "tie", x: "both_bad" };

function rateMessages() {
  const system = rateState.form.system.value.trim();
  let turns;
  if (rateState.form.source.value === "held-out") {
    const prompt = rateState.prompts[rateState.index];
    turns = prompt ? prompt.messages : [];
  } else {
    turns = [{ role: "user", content: rateState.form.prompt.value }];
  }
  // A typed system prompt replaces the prompt's own, if it has one.
  if (system) turns = [{ role: "system", content: system }].concat(
    turns.filter((m) => m.role !== "system"));
  return turns;
}

function rateSource() {
  return rateState.form.source.value === "held-out" ? "held-out:" + rateState.form.job.value : "typed";
}

function rateShowHeldOut() {
  const box = document.getElementById("held-out-prompt");
  const prompt = rateState.prompts[rateState.index];
  box.replaceChildren(prompt
    ? el("div", { class: "example" },
         el("small", {}, `held-out prompt ${rateState.index + 1} of ${rateState.prompts.length} ` +
            `(line ${prompt.line})`),
         prompt.messages.map((m) => el("div", { class: "bubble " + m.role },
           el("b", {}, m.role), el("div", {}, m.content))))
    : el("p", {}, "Every held-out prompt of this job has been shown."));
}

async function rateLoadHeldOut() {
  const box = document.getElementById("held-out-prompt");
  rateState.prompts = [];
  rateState.index = 0;
  if (!rateState.form.job.value) {
    box.replaceChildren(el("p", {}, "No succeeded job yet: type a prompt instead."));
    return;
  }
  try {
    const list = await api("/v1/ratings/prompts?job=" + encodeURIComponent(rateState.form.job.value));
    rateState.prompts = list.data;
    rateShowHeldOut();
  } catch (error) {
    box.replaceChildren(failure(error));
  }
}

function rateSourceChanged() {
  const heldOut = rateState.form.source.value === "held-out";
  document.getElementById("typed").hidden = heldOut;
  document.getElementById("held-out").hidden = !heldOut;
  if (heldOut && !rateState.prompts.length) rateLoadHeldOut();
}

// --- generating and voting ------------------------------------------------------------------
function rateColumns() {
  const column = (n, id) => el("div", { class: "column" },
    el("h3", { id: id + "-title" }, "Answer " + n), el("div", { class: "answer", id }));
  document.getElementById("answers").replaceChildren(
    column(1, "answer-left"), column(2, "answer-right"));
  return [document.getElementById("answer-left"), document.getElementById("answer-right")];
}

async function rateGenerate() {
  const messages = rateMessages();
  const status = document.getElementById("rate-status");
  if (!messages.some((m) => m.role === "user" && m.content.trim())) {
    status.replaceChildren(failure(new Error("Type a prompt first.")));
    return;
  }
  const models = { a: rateState.form.model_a.value, b: rateState.form.model_b.value };
  // The side is drawn per prompt: a rater who favours the left answer cannot favour a model.
  const left = Math.random() < 0.5 ? "a" : "b";
  const right = left === "a" ? "b" : "a";
  const settings = { temperature: Number(rateState.form.temperature.value),
                     max_tokens: Number(rateState.form.max_tokens.value) };
  rateState.vote = null;
  document.getElementById("revealed").replaceChildren();
  document.getElementById("ideal").value = "";
  const [outLeft, outRight] = rateColumns();
  status.replaceChildren("generating both answers…");
  rateState.form.generate.disabled = true;
  try {
    // One after the other, as the server's engine answers one request at a time anyway.
    await streamAnswer(models[left], messages, settings, outLeft);
    await streamAnswer(models[right], messages, settings, outRight);
    rateState.vote = { messages, models, left, answers: { [left]: outLeft.textContent,
                                                     [right]: outRight.textContent } };
    status.replaceChildren("Which answer is better? Press a / b (or 1 / 2), t for a tie, " +
                           "x if both are bad.");
  } catch (error) {
    status.replaceChildren(failure(error));
  } finally {
    rateState.form.generate.disabled = false;
  }
}

async function rateVote(choice) {
  if (!rateState || !rateState.vote || rateState.vote.stored) return;
  const vote = rateState.vote;
  vote.stored = true;  // a second key press must not store the vote twice
  const right = vote.left === "a" ? "b" : "a";
  const verdict = choice === "left" ? vote.left : choice === "right" ? right : choice;
  const ideal = document.getElementById("ideal").value;
  const status = document.getElementById("rate-status");
  try {
    const rating = await api("/v1/ratings", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages: vote.messages, model_a: vote.models.a,
                             model_b: vote.models.b, answer_a: vote.answers.a,
                             answer_b: vote.answers.b, left: vote.left, verdict,
                             ideal: ideal.trim() ? ideal : null, source: rateSource() }) });
    rateReveal(vote, rating);
    status.replaceChildren("Vote stored. Next prompt: press n or the button.");
    await rateRefreshTally();
  } catch (error) {
    vote.stored = false;
    status.replaceChildren(failure(error));
  }
}

function rateReveal(vote, rating) {
  const right = vote.left === "a" ? "b" : "a";
  document.getElementById("answer-left-title").textContent =
    "Answer 1: " + vote.models[vote.left];
  document.getElementById("answer-right-title").textContent = "Answer 2: " + vote.models[right];
  const said = { tie: "a tie", both_bad: "both bad" }[rating.verdict] ||
    `${rating.winner} wins`;
  document.getElementById("revealed").replaceChildren(el("p", { class: "ok" },
    `Answer 1 was ${vote.models[vote.left]}, Answer 2 was ${vote.models[right]}: ${said}` +
    (rating.ideal ? " (with your ideal answer)." : ".")));
}

function rateNext() {
  // Clear the voted answers first: a held-out prompt is answered at once into new columns.
  rateState.vote = null;
  document.getElementById("answers").replaceChildren();
  document.getElementById("revealed").replaceChildren();
  if (rateState.form.source.value === "held-out") {
    rateState.index += 1;
    rateShowHeldOut();
    if (rateState.index < rateState.prompts.length) rateGenerate();
  } else {
    rateState.form.prompt.value = "";
    rateState.form.prompt.focus();
  }
}

function onRateKey(event) {
  if (!rateState || !document.getElementById("rate-page")) return;
  const target = event.target;
  // Typing an ideal answer or a prompt must never vote.
  if (event.ctrlKey || event.metaKey || event.altKey ||
      (target && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"]
        .includes(target.tagName)))) return;
  const key = event.key.toLowerCase();
  if (key === "n" && rateState.vote && rateState.vote.stored) {
    event.preventDefault();
    rateNext();
  } else if (key in RATE_KEYS && rateState.vote && !rateState.vote.stored) {
    event.preventDefault();
    rateVote(RATE_KEYS[key]);
  }
}
document.addEventListener("keydown", onRateKey);

// --- tally and export -----------------------------------------------------------------------
async function rateRefreshTally() {
  const list = await api("/v1/ratings?limit=1");
  const summary = list.summary;
  const models = Object.entries(summary.models).sort((x, y) => y[1].wins - x[1].wins);
  const skipped = Object.entries(summary.export.skipped).map(([why, n]) => `${n} × ${why}`);
  document.getElementById("tally").replaceChildren(
    el("p", {}, `${summary.votes} votes, ${summary.export.pairs} preference pairs` +
       (skipped.length ? ` (left out: ${skipped.join(", ")})` : "") + "."),
    models.length ? el("table", { class: "tally" },
      el("tr", {}, ["model", "votes", "wins", "losses", "ties", "both bad"]
        .map((h) => el("th", {}, h))),
      models.map(([name, c]) => el("tr", {}, el("td", {}, el("code", {}, name)),
        [c.votes, c.wins, c.losses, c.ties, c.both_bad].map((n) => el("td", {}, n))))) : null);
  // The job trains the model the votes favour, unless the user picked another.
  const pick = rateState.jobModel;
  if (models.length && !pick.dataset.touched) pick.value = models[0][0];
}

async function rateDownload(format) {
  // A fetch (not a link) so the API key goes with it.
  const response = await fetch("/v1/ratings/export?format=" + format,
                               { headers: { Authorization: "Bearer " + key() } });
  if (!response.ok) throw new Error(response.statusText);
  const link = el("a", { href: URL.createObjectURL(await response.blob()),
                         download: `ratings-${format}.jsonl` });
  link.click();
}

async function rateStartJob() {
  const status = document.getElementById("start-status");
  status.replaceChildren("exporting the votes…");
  try {
    const file = await api("/v1/ratings/export", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ format: "openai" }) });
    const job = await api("/v1/fine_tuning/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: rateState.jobModel.value, training_file: file.id,
                             method: { type: "dpo", dpo: { hyperparameters: {} } },
                             metadata: { source: "ratings" } }) });
    location.hash = "#/jobs/" + job.id;
  } catch (error) {
    status.replaceChildren(failure(error));
  }
}

// --- the page -------------------------------------------------------------------------------
function rateModelSelect(name, ids, chosen) {
  const select = el("select", { name, id: name.replace("_", "-") },
    ids.map((id) => el("option", { value: id }, id)));
  select.value = chosen;
  return select;
}

async function ratePage() {
  const [models, jobs] = await Promise.all([api("/v1/models"),
                                            api("/v1/fine_tuning/jobs?limit=100")]);
  const ids = models.data.map((m) => m.id);
  const succeeded = jobs.data.filter((j) => j.status === "succeeded");
  const radio = (value, label, checked) => el("label", {},
    el("input", Object.assign({ type: "radio", name: "source", value },
                              checked ? { checked: "" } : {})), " " + label);
  const form = el("form", { id: "rate-form" },
    el("p", { class: "picks" },
       el("label", {}, "model A ", rateModelSelect("model_a", ids, ids[0])),
       el("label", {}, "model B ", rateModelSelect("model_b", ids, ids[1] || ids[0]))),
    el("p", {}, "prompts: ", radio("typed", "typed", true), " ",
       radio("held-out", "held-out prompts of a job", false)),
    el("div", { id: "typed" },
       el("textarea", { name: "prompt", id: "prompt", rows: 3, placeholder: "your prompt" })),
    el("div", { id: "held-out", hidden: "" },
       el("label", {}, "job ", el("select", { name: "job", id: "held-out-job" },
         succeeded.map((j) => el("option", { value: j.id }, `${j.id} (${j.fine_tuned_model})`)))),
       el("div", { id: "held-out-prompt" })),
    el("textarea", { name: "system", id: "system", rows: 2,
                     placeholder: "system prompt (optional)" }),
    el("p", {}, el("label", {}, "temperature ", el("input", {
         name: "temperature", id: "temperature", type: "number", min: 0, max: 2, step: 0.1,
         value: 0 })), "  ",
       el("label", {}, "max tokens ", el("input", { name: "max_tokens", id: "max-tokens",
         type: "number", min: 1, max: 2048, value: 128 })), "  ",
       el("button", { type: "submit", name: "generate", id: "generate" }, "Generate answers")));
  const jobModel = rateModelSelect("job_model", ids, ids[0]);
  rateState = { form, jobModel, prompts: [], index: 0, vote: null };
  form.addEventListener("submit", (event) => { event.preventDefault(); rateGenerate(); });
  for (const input of form.querySelectorAll("input[name=source]")) {
    input.addEventListener("change", rateSourceChanged);
  }
  form.job.addEventListener("change", rateLoadHeldOut);

  const button = (id, label, choice) => el("button", { id, onclick: () => rateVote(choice) },
                                           label);
  jobModel.addEventListener("change", () => { jobModel.dataset.touched = "1"; });
  show(el("h1", { id: "rate-page" }, "Rate"),
       el("p", {}, "Blind A/B rating: both models answer the same prompt, shown as Answer 1 " +
          "and Answer 2 on sides drawn at random; the names appear after your vote. Votes " +
          "become preference pairs (the winner's answer, or your ideal answer, over the " +
          "other) for a DPO job."),
       form,
       el("div", { class: "columns", id: "answers" }),
       el("p", { id: "rate-status", class: "help" }),
       el("label", {}, "ideal answer (optional: it becomes the preferred answer; with a tie " +
          "or both bad, each answer is rejected in its favour)",
          el("textarea", { id: "ideal", rows: 3 })),
       el("p", { class: "actions" }, button("vote-left", "Answer 1 is better (a)", "left"),
          button("vote-right", "Answer 2 is better (b)", "right"),
          button("vote-tie", "Tie (t)", "tie"), button("vote-both-bad", "Both bad (x)", "both_bad"),
          el("button", { id: "next", onclick: () => rateState.vote && rateState.vote.stored &&
                         rateNext() }, "Next prompt (n)")),
       el("p", { class: "help", id: "rate-keys" },
          "Keys: a or 1 = Answer 1 is better, b or 2 = Answer 2 is better, t = tie, " +
          "x = both bad, n = next prompt. Keys do nothing while you type in a text box."),
       el("div", { id: "revealed" }),
       el("h2", {}, "Tally"), el("div", { id: "tally" }),
       el("h2", {}, "Export"),
       el("p", { class: "actions" },
          el("button", { id: "export-openai", onclick: () => rateDownload("openai")
                           .catch((e) => alert(e.message)) }, "Download JSONL (OpenAI DPO)"),
          el("button", { id: "export-preference", onclick: () => rateDownload("preference")
                           .catch((e) => alert(e.message)) },
             "Download JSONL (prompt/chosen/rejected)")),
       el("p", {}, el("label", {}, "train ", jobModel), " ",
          el("button", { id: "start-job", onclick: rateStartJob },
             "Start a DPO job from these votes"),
          el("small", { class: "help" }, "Exports the votes as a fine-tune file and starts a " +
             "DPO job on it (at least 10 pairs are needed); the model the votes favour is " +
             "chosen unless you pick another.")),
       el("div", { id: "start-status" }));
  await rateRefreshTally();
}

PAGES.rate = () => ratePage();
