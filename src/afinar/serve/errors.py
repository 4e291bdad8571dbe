"""Errors in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}.

Client mistakes are 4xx, never 5xx: the OpenAI SDK retries 5xx (and 409), which would repeat a
job creation.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from afinar.errors import AfinarError


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)


def not_found(kind: str, ident: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No {kind} found with id '{ident}'.", param=param,
                    code=f"{kind.replace(' ', '_')}_not_found")


def envelope(status: int, message: str, type: str = "invalid_request_error",
             param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": type, "param": param, "code": code}})


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return envelope(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(AfinarError)
    async def _afinar_error(request: Request, exc: AfinarError):
        message = exc.message + (f" ({exc.hint})" if exc.hint else "")
        return envelope(400, message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        what = ("unknown parameter" if first.get("type") == "extra_forbidden"
                else first.get("msg", "invalid request"))
        message = f"{param + ': ' if param else ''}{what}"
        return envelope(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error"
        return envelope(exc.status_code, str(exc.detail), kind)
