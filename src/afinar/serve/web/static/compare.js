// afinar dashboard: the Compare page. Loaded after app.js, whose helpers it uses.
"use strict";
