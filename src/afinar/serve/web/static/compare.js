// afinar dashboard: the Compare page. Two or more registry versions: their loss curves
// overlaid, the settings that differ, and the metrics side by side (the best of each row
// marked), the same table as `afinar models compare`. Loaded after app.js.
"use strict";

const SERIES_COLOURS = 6;  // s0..s5 in app.css; more versions reuse them

function bestIndexes(row) {
  const numbers = row.values.map((v) => (typeof v === "number" ? v : null));
  const present = numbers.filter((v) => v !== null);
  if (!row.better || present.length < 2) return new Set();
  const best = row.better === "lower" ? Math.min(...present) : Math.max(...present);
  return new Set(numbers.flatMap((v, i) => (v === best ? [i] : [])));
}

function cell(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "object") return JSON.stringify(value);
  return typeof value === "number" && !Number.isInteger(value) ? value.toFixed(4) : String(value);
}

async function pickVersions() {
  const versions = await api("/v1/registry/versions");
  const boxes = versions.data.map((v) => el("label", { class: "pick" },
    el("input", { type: "checkbox", name: "version", value: v.id }),
    ` ${v.id} ${v.tags.length ? "(" + v.tags.join(", ") + ")" : ""} · ${v.method || ""}`));
  const go = el("button", { id: "compare-go", onclick: () => {
    const chosen = boxes.map((b) => b.firstChild).filter((b) => b.checked).map((b) => b.value);
    if (chosen.length < 2) { alert("Choose at least two versions."); return; }
    location.hash = "#/compare/" + chosen.join(",");
  } }, "Compare");
  show(el("h1", {}, "Compare versions"),
       versions.data.length < 2
         ? el("p", {}, "The registry needs at least two versions to compare.")
         : el("div", {}, el("div", { class: "picks" }, boxes), go));
}

async function comparePage(refs) {
  if (!refs) return pickVersions();
  const c = await api("/v1/registry/compare?versions=" + encodeURIComponent(refs));
  const ids = c.versions.map((v) => v.id);
  const logScale = sessionStorage.getItem("afinar-log-scale") === "1";
  const series = ids.flatMap((id, i) => [
    { cls: `s${i % SERIES_COLOURS}`, points: c.curves[id].train, dots: false },
    { cls: `s${i % SERIES_COLOURS} held`, points: c.curves[id].eval }]);
  const legend = el("p", { class: "legend" }, ids.map((id, i) =>
    el("span", { class: `s${i % SERIES_COLOURS}` }, `— ${id}  `)),
    el("small", {}, "(lines: training loss; dots: held-out loss)"));
  const header = el("tr", {}, el("th", {}, ""), c.versions.map((v) => el("th", {},
    el("a", { href: "#/models/" + v.id }, v.id), v.tags.length ? ` (${v.tags.join(", ")})` : "")));
  const metrics = el("table", { class: "compare metrics", id: "compare-metrics" }, header.cloneNode(true),
    c.metrics.map((row) => {
      const best = bestIndexes(row);
      return el("tr", {}, el("td", {}, row.metric), row.values.map((v, i) =>
        el("td", { class: best.has(i) ? "best" : "" }, cell(v))));
    }));
  const diff = c.config_diff.length
    ? el("table", { class: "compare config", id: "config-diff" }, header.cloneNode(true),
        c.config_diff.map((row) => el("tr", {}, el("td", {}, el("code", {}, row.setting)),
          row.values.map((v) => el("td", {}, cell(v))))))
    : el("p", { id: "config-diff" }, "The configs are identical.");
  show(el("h1", {}, "Compare ", ids.join(" · ")),
       el("h2", {}, "Loss"), logScaleToggle(), legend, lineChart(series, logScale),
       el("h2", {}, "Settings that differ"), diff,
       el("h2", {}, "Metrics"), el("small", { class: "help" },
         "Evaluation metrics first, then training ones; the best of each row in bold."),
       metrics);
}

PAGES.compare = (refs) => comparePage(refs);
