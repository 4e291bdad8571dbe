"""Typed dependencies shared by the routers: the store, the engine, the settings, the API key
and the project it belongs to."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fastapi import Request

from afinar.serve.engine import Engine
from afinar.serve.errors import ApiError
from afinar.serve.settings import ServeSettings
from afinar.serve.store import Store
from afinar.serve.web.pages import is_public


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


@dataclass(frozen=True)
class Project:
    """Whose request this is. `view`: the project whose objects it sees (None: an admin key
    without an OpenAI-Project header sees them all). `owner`: the project what it creates
    belongs to."""
    view: str | None
    owner: str


DEFAULT = Project("default", "default")


def get_project(request: Request) -> Project:
    return getattr(request.state, "project", DEFAULT)


def _match(token: str, keys: dict[str, str | None]) -> tuple[bool, str | None]:
    # Compared with every key in constant time, so a wrong key's timing tells nothing.
    found, project = False, None
    for key, owner in keys.items():
        if secrets.compare_digest(token.encode(), key.encode()):
            found, project = True, owner
    return found, project


def check_api_key(request: Request) -> None:
    """With keys configured, every request needs `Authorization: Bearer <key>`; without any,
    the server listens on loopback only, accepts whatever key a client sends, and everything is
    in the project 'default'. The key decides the project (an admin key may name one in an
    OpenAI-Project header, as OpenAI's clients send it when given `project=`)."""
    keys = request.app.state.settings.key_projects()
    if not keys or is_public(request.url.path):
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "You didn't provide an API key. You need to provide your API key in "
                       "an Authorization header using Bearer auth (i.e. Authorization: Bearer "
                       "YOUR_KEY).", code="missing_api_key")
    found, project = _match(token.strip(), keys)
    if not found:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    asked = request.headers.get("openai-project", "").strip() or None
    if project is None:  # an admin key
        request.state.project = Project(asked, asked or "default")
    elif asked not in (None, project):
        raise ApiError(401, f"The OpenAI-Project header '{asked}' does not match the project "
                       "of this API key.", code="invalid_project")
    else:
        request.state.project = Project(project, project)
