"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}`, never a stack trace.

`APIError` is what handlers raise; `install_error_handlers` makes FastAPI answer every failure
(ours, its own 422 validation errors, unknown routes, unexpected exceptions) with that body.
`from_validation_error` and `from_value_error` name the parameter a bad request got wrong.
No torch here.
"""

from __future__ import annotations

import logging

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kestrel.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)


class APIError(Exception):
    """A request that cannot be served; becomes an OpenAI error body with `status_code`."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.headers = headers

    def to_body(self) -> dict:
        kind = "invalid_request_error" if self.status_code < 500 else "server_error"
        if self.status_code == 401:
            kind = "authentication_error"
        info = ErrorInfo(message=self.message, type=kind, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def to_response(self) -> JSONResponse:
        headers = dict(self.headers or {})
        if self.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(self.to_body(), status_code=self.status_code, headers=headers)


def from_validation_error(error: pydantic.ValidationError | RequestValidationError) -> APIError:
    """The first problem pydantic found, with the parameter it concerns."""
    details = error.errors()
    if not details:
        return APIError("invalid request body")
    first = details[0]
    if first.get("type") == "json_invalid":
        return APIError(f"The request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # Union branches show up in `loc` as type names ("str", "list[int]"); they are not fields.
    path = [p for p in loc if not _is_type_name(p)]
    param = ".".join(path) or None
    top = path[0] if path else None
    if first.get("type") == "missing":
        return APIError(f"'{param}' is a required property", param=top)
    where = f"'{param}'" if param else "the request body"
    branches = _union_branches(details, loc)
    if len(branches) > 1:
        return APIError(f"Invalid type for {where}: expected one of {', '.join(branches)}.", param=top,
                        code="invalid_type")
    given = first.get("input")
    message = f"Invalid value for {where}: {first.get('msg')}"
    if given is not None and not isinstance(given, (dict, list)):
        message += f" (got {given!r})"
    return APIError(message + ".", param=top, code="invalid_type")


def _union_branches(details: list, loc: list[str]) -> list[str]:
    """The type names of the union branches that all failed at the first error's union, in order."""
    cut = next((i for i, part in enumerate(loc) if _is_type_name(part)), None)
    if cut is None:
        return []
    names: list[str] = []
    for d in details:
        other = [str(p) for p in d.get("loc", ()) if p != "body"]
        if other[:cut] == loc[:cut] and len(other) > cut and other[cut] not in names:
            names.append(other[cut])
    return names


def _is_type_name(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "dict", "list", "none") or "[" in part \
        or part.startswith(("function-", "union"))


def from_value_error(error: ValueError, renames: dict[str, str] | None = None) -> APIError:
    """A `SamplingParams` ValueError ("top_p must be in (0, 1], got 2") with its parameter named.

    `renames` maps SamplingParams names to the names this endpoint uses (max_tokens ->
    max_completion_tokens, logprobs -> top_logprobs, ...).
    """
    message = str(error)
    name = message.split(" ", 1)[0].strip(":,.")
    if not name.isidentifier():
        return APIError(message)
    renames = renames or {}
    if name in renames:
        message = renames[name] + message[len(name):]
        name = renames[name]
    return APIError(message, param=name)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error with an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.to_response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).to_response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return APIError(str(exc.detail), exc.status_code, code=code, headers=exc.headers).to_response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving a request")
        return APIError("internal server error (the server log has the details)", 500).to_response()
