"""What /openapi.json says about each route: its request body, its replies and its errors.

The generating handlers read their bodies themselves (strict pydantic, errors naming the parameter),
so FastAPI cannot see those bodies. `route_docs(...)` gives a route decorator the arguments that
document its body, its 200 reply (JSON, and server-sent events when it streams) and every error
status it can answer with (an OpenAI error body); `install_openapi(app, models)` adds the request
models' JSON schemas to the document's components. No torch here.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import BaseModel

from kestrel.server.protocol import ErrorResponse

ERROR_TEXT = {
    400: "Invalid request: the error's `param` names the field, its `message` the allowed values.",
    401: "Missing or wrong API key (when the server has one): send `Authorization: Bearer <key>`.",
    404: "The `model` is not served here.",
    408: "The request did not finish within the server's --request-timeout.",
    413: "The request body is larger than --max-request-body-mb.",
    500: "An internal error (the server log has the details).",
    503: "Not ready (loading, restarting, shutting down) or at capacity: retry after `Retry-After` seconds.",
}
GENERATING_ERRORS = (400, 401, 404, 408, 413, 500, 503)


_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
"""One server-sent event (OpenAPI 3.1: an event-stream's `schema` describes each event)."""

def route_docs(reply: object | None = None, body: type[BaseModel] | None = None, errors: tuple[int, ...] = (),
               streams: bool = False, content_type: str | None = None, description: str = "") -> dict:
    """Keyword arguments for `router.get/post` documenting a route."""
    ok: dict = {"description": description or "Success."}
    if content_type is not None:
        ok["content"] = {content_type: {"schema": {"type": "string"}}}
    elif streams:
        ok["content"] = {"text/event-stream": {"schema": _SSE_EVENT,
                                               "description": "With `stream: true`: `data: {json}` events, "
                                                              "`data: [DONE]` last."}}
    responses: dict = {200: ok}
    for code in errors:
        responses[code] = {"model": ErrorResponse, "description": ERROR_TEXT[code]}
    kwargs: dict = {"responses": responses}
    if reply is not None:
        kwargs["response_model"] = reply
    else:
        kwargs["response_class"] = Response  # no media type: FastAPI documents no JSON reply
    if body is not None:
        kwargs["openapi_extra"] = {"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}}
    return kwargs


def install_openapi(app: FastAPI, request_models: list[type[BaseModel]]) -> None:
    """Make `app.openapi()` include the request models' schemas (built once, on first use)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in request_models:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub_schema in model_schema.pop("$defs", {}).items():
                    components.setdefault(name, sub_schema)
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
