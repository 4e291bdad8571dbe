"""Typed dependencies shared by the routers: the store, the engine, the settings, the API key."""

from __future__ import annotations

import secrets

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


def check_api_key(request: Request) -> None:
    """With keys configured, every request needs `Authorization: Bearer <key>`; without any,
    the server listens on loopback only and accepts whatever key a client sends."""
    keys = request.app.state.settings.keys()
    if not keys or is_public(request.url.path):
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "You didn't provide an API key. You need to provide your API key in "
                       "an Authorization header using Bearer auth (i.e. Authorization: Bearer "
                       "YOUR_KEY).", code="missing_api_key")
    if not any(secrets.compare_digest(token.strip(), key) for key in keys):
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
