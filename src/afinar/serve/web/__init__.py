"""The dashboard `afinar serve` shows at `/`: static pages that call the same API as any client.

The page shell and its assets (static/: one HTML file, one script, one stylesheet, written for
afinar, no third-party code, no CDN, no web fonts) carry no data, so they are served without a
key; everything the pages show comes from the /v1 API with the key typed once in the page (kept
in the browser's sessionStorage). No business logic lives here.
"""
