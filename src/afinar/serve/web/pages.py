"""Routes for the dashboard shell and its static assets (see the package docstring)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from afinar.serve.errors import ApiError

router = APIRouter(include_in_schema=False)
_TYPES = {"app.css": "text/css", **{name: "text/javascript" for name in (
    "app.js", "models.js", "compare.js", "rate.js")}}
# The shell may only load what this package ships (no inline scripts, no other origin).
_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
           "connect-src 'self'")


def _asset(name: str) -> bytes:
    return files("afinar.serve.web").joinpath("static", name).read_bytes()


@router.get("/")
def index() -> Response:
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": _POLICY, "Cache-Control": "no-cache"})


@router.get("/ui/{name}")
def asset(name: str) -> Response:
    if name not in _TYPES:
        raise ApiError(404, f"No dashboard asset '{name}'.")
    return Response(_asset(name), media_type=f"{_TYPES[name]}; charset=utf-8",
                    headers={"Cache-Control": "no-cache"})


def is_public(path: str) -> bool:
    """The shell and its assets hold no data: they load before the key is typed."""
    return path == "/" or (path.startswith("/ui/") and path[4:] in _TYPES)
