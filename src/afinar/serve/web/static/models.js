// afinar dashboard: the Models page. Loaded after app.js, whose helpers it uses.
"use strict";

async function modelsPage() {
  const list = await api("/v1/models");
  show(el("h1", {}, "Models"),
       el("table", { class: "models" },
         el("tr", {}, ["model", "owned by", "created", ""].map((h) => el("th", {}, h))),
         list.data.map((m) => el("tr", { class: "model" }, el("td", {}, el("code", {}, m.id)),
           el("td", {}, m.owned_by), el("td", {}, when(m.created)),
           el("td", {}, el("a", { href: "#/playground/" + encodeURIComponent(m.id) },
                           "try it"))))));
}

PAGES.models = () => modelsPage();
