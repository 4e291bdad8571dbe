// afinar dashboard: the Models page (the registry of versions, what the server serves) and a
// version's page (lineage, tags, eval report, verified exports). Loaded after app.js, whose
// helpers it uses.
"use strict";

function fmt(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number" && !Number.isInteger(value)) return value.toFixed(4);
  return String(value);
}

async function modelsPage() {
  const [versions, served] = await Promise.all([api("/v1/registry/versions"), api("/v1/models")]);
  const registry = versions.data.length
    ? el("table", { class: "versions" },
        el("tr", {}, ["version", "tags", "method", "base model", "from job", "held-out loss",
                      "finished"].map((h) => el("th", {}, h))),
        versions.data.map((v) => el("tr", { class: "version" },
          el("td", {}, el("a", { href: "#/models/" + v.id }, v.id)),
          el("td", {}, v.tags.map((t) => el("span", { class: "tag" }, t))),
          el("td", {}, v.method || "–"), el("td", { class: "path" }, v.base_model || "–"),
          el("td", {}, v.job ? el("a", { href: "#/jobs/" + v.job }, v.job) : "CLI"),
          el("td", {}, fmt(v.metrics.eval_loss ?? v.metrics.best_eval_loss)),
          el("td", {}, v.finished_at ? v.finished_at.replace("T", " ").slice(0, 19)
                                     : v.status))))
    : el("p", {}, "No versions yet: every finished training run (CLI or job) is registered.");
  show(el("h1", {}, "Models"),
       el("h2", {}, "Versions (the registry)"), registry,
       el("p", {}, el("a", { href: "#/compare" }, "Compare versions…")),
       el("h2", {}, "Served by this server"),
       el("table", { class: "models" },
         el("tr", {}, ["model", "owned by", "created", ""].map((h) => el("th", {}, h))),
         served.data.map((m) => el("tr", { class: "model" }, el("td", {}, el("code", {}, m.id)),
           el("td", {}, m.owned_by), el("td", {}, when(m.created)),
           el("td", {}, el("a", { href: "#/playground/" + encodeURIComponent(m.id) },
                           "try it"))))));
}

function lineage(version) {
  const l = version.lineage;
  const steps = [el("span", { class: "node" }, "base ", el("code", {}, l.base_model || "?"))];
  if (l.parent_version) {
    steps.push(el("span", { class: "node" }, "trained on top of ",
                  el("a", { href: "#/models/" + l.parent_version }, l.parent_version)));
  }
  steps.push(el("span", { class: "node" }, l.job
    ? el("a", { href: "#/jobs/" + l.job }, l.job) : "afinar train (CLI)"));
  steps.push(el("span", { class: "node current" }, version.id,
                l.fine_tuned_model ? el("small", {}, " " + l.fine_tuned_model) : null));
  const chain = el("p", { class: "lineage", id: "lineage" });
  steps.forEach((step, i) => { if (i) chain.append(" → "); chain.append(step); });
  const checkpoints = l.checkpoints.length
    ? el("p", { class: "checkpoints", id: "version-checkpoints" }, "checkpoints: ",
         l.checkpoints.flatMap((c, i) => [
        i ? ", " : "", c.model
          ? el("a", { href: "#/playground/" + encodeURIComponent(c.model) }, "step " + c.step)
          : "step " + c.step]))
    : null;
  return [chain, checkpoints];
}

function tagEditor(version) {
  const input = el("input", { id: "new-tag", placeholder: "tag, e.g. prod", size: 14 });
  const form = el("form", { id: "tag-form" }, input, " ", el("button", { type: "submit" }, "Add tag"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      await api(`/v1/registry/versions/${version.id}/tags`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ tag: input.value }) });
      route();
    } catch (error) { form.append(failure(error)); }
  });
  const tags = version.tags.map((t) => el("span", { class: "tag" }, t, " ",
    el("button", { class: "link", title: "remove the tag", onclick: async () => {
      await api("/v1/registry/tags/" + encodeURIComponent(t), { method: "DELETE" });
      route();
    } }, "×")));
  return el("div", { class: "tags" }, tags, form);
}

async function reportSection(version) {
  if (!version.evaluated) {
    return el("p", { id: "report" }, `Not evaluated yet: run afinar eval ${version.id}.`);
  }
  const report = await api(`/v1/registry/versions/${version.id}/report`);
  const download = el("button", { id: "report-html", onclick: async () => {
    // A fetch (not a link) so the API key goes with it; the file is saved, not opened here.
    const response = await fetch(`/v1/registry/versions/${version.id}/report.html`,
                                 { headers: { Authorization: "Bearer " + key() } });
    const link = el("a", { href: URL.createObjectURL(await response.blob()),
                           download: `${version.id}-report.html` });
    link.click();
  } }, "Download report.html");
  return el("div", { id: "report" },
    el("p", {}, `${report.data.examples} held-out examples (${report.data.source}); ` +
       `baseline ${report.baseline && report.baseline.spec ? report.baseline.spec : "none"}.`),
    el("table", { class: "metrics" },
      el("tr", {}, ["metric", "baseline", "this model", "change"].map((h) => el("th", {}, h))),
      report.metrics.map((m) => {
        const better = m.delta === null || m.delta === undefined || !m.better ? ""
          : (m.better === "lower") === (m.delta < 0) ? "better" : "worse";
        return el("tr", {}, el("td", {}, m.name), el("td", {}, fmt(m.baseline)),
                  el("td", {}, fmt(m.model)),
                  el("td", { class: better }, m.delta === null || m.delta === undefined
                    ? "–" : (m.delta > 0 ? "+" : "") + fmt(m.delta)));
      })),
    report.warnings.length ? el("ul", { class: "warnings" },
      report.warnings.map((w) => el("li", { class: "issue warning" }, w))) : null,
    download);
}

function exportRow(x) {
  const v = x.result && x.result.verification;
  const verdict = x.status !== "succeeded" ? (x.error || "")
    : v ? `verification ${v.passed ? "PASSED" : "FAILED"} (${v.engine}): ` +
          `${v.identical_answers}/${v.prompts} answers identical, greedy agreement ` +
          `${(100 * v.greedy_agreement).toFixed(1)}%`
      : "not verified";
  return el("tr", { class: "export " + x.status },
    el("td", {}, x.format + (x.quant ? " " + x.quant : "")),
    el("td", {}, el("span", { class: "status " + x.status }, x.status)),
    el("td", { class: "verdict" }, verdict),
    el("td", { class: "path" }, x.result ? x.result.output : ""));
}

function exportsSection(version) {
  const format = el("select", { id: "export-format" },
    ["merged", "gguf", "ollama", "gguf-adapter"].map((f) => el("option", { value: f }, f)));
  const quant = el("input", { id: "export-quant", placeholder: "type (default)", size: 12 });
  const start = el("button", { id: "export-start", onclick: async () => {
    try {
      await api(`/v1/registry/versions/${version.id}/exports`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ format: format.value, quant: quant.value.trim() || null }) });
      route();
    } catch (error) { start.after(failure(error)); }
  } }, "Export and verify");
  return el("div", {},
    el("p", {}, format, " ", quant, " ", start,
       el("small", { class: "help" }, "Runs afinar export: the exported model must answer " +
          "held-out prompts like the trained one, or nothing is published.")),
    version.exports.length ? el("table", { class: "exports" },
      el("tr", {}, ["export", "status", "verification", "output"].map((h) => el("th", {}, h))),
      version.exports.map(exportRow)) : null);
}

async function versionPage(ref) {
  const version = await api("/v1/registry/versions/" + encodeURIComponent(ref));
  show(el("h1", {}, "Version ", el("code", {}, version.id)),
       el("p", {}, el("span", { class: "status " + version.status }, version.status),
          ` · ${version.method || ""} · data ${version.data_path || "?"}` +
          (version.data_sha256 ? ` (sha256 ${version.data_sha256.slice(0, 12)}…)` : "")),
       ...lineage(version),
       el("h2", {}, "Tags"), tagEditor(version),
       el("h2", {}, "Evaluation"), await reportSection(version),
       el("h2", {}, "Exports"), exportsSection(version),
       el("h2", {}, "Config"), el("pre", { class: "config" }, version.config || "–"));
  if (version.exports.some((x) => x.status === "running")) timer = setTimeout(route, 1000);
}

PAGES.models = (id) => (id ? versionPage(id) : modelsPage());
