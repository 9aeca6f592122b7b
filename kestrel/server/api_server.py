"""The API process: a FastAPI app on uvicorn (uvloop) in front of the engine and detokenizer.

Routes: POST /v1/chat/completions, POST /v1/completions, POST /generate, GET /v1/models,
GET /v1/stats, GET /debug/state (KV slots free/cached/total, prefix-cache hit rate, last integrity
check, requests in flight),
and, open to all: GET /health (200 only when it can serve: 503 while loading, restarting, draining,
after a process died, or when the engine is stalled), GET /metrics, GET /dashboard, GET /version,
GET /openapi.json (every route's body and errors, `openapi.py`). With `api_key` set, the other
routes need `Authorization: Bearer <key>` (compared in constant time). CORS headers only for
`allowed_origins`. Middleware: body size limit (413), admission while draining (`middleware.py`).

This process tokenizes, applies chat templates (off the event loop) and speaks HTTP; it never
imports torch (the engine process owns the model). It drains when the supervisor sends `Drain`:
new requests get 503, in-flight ones finish (or fail at the deadline), then uvicorn exits.
Input/output: HTTP on one side, ZMQ (`client.EngineClient`) on the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import logging
import sys
import time
from collections.abc import Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from kestrel.server import generate as native
from kestrel.server import openai_serving
from kestrel.server.child import init_child_process
from kestrel.server.client import EngineClient, EngineError
from kestrel.server.config import IpcAddresses, ServerConfig
from kestrel.server.errors import APIError, install_error_handlers
from kestrel.server.middleware import AdmissionMiddleware, BodyLimitMiddleware
from kestrel.server.observability import observability_routes
from kestrel.server.openapi import GENERATING_ERRORS, install_openapi, route_docs
from kestrel.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                     CompletionResponse, GenerateRequest, GenerateResult, HealthResponse, ModelCard,
                                     ModelList, VersionResponse)
from kestrel.server.serving import ServerState

logger = logging.getLogger(__name__)

_FAIL_FLUSH_S = 2.0
"""After the shutdown deadline: time for the failed calls to send their error."""


def _package_version() -> str:
    # Not `kestrel.__version__`: importing the package root would pull in `kestrel.llm` (torch).
    try:
        return importlib.metadata.version("kestrel")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


__version__ = _package_version()


def run_api_process(config: ServerConfig, addrs: IpcAddresses) -> None:
    """Process entry point: serve HTTP until drained (the supervisor's `Drain`) or SIGTERM."""
    init_child_process("api", config.log_level)
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield  # the supervisor owns SIGINT/SIGTERM; a drain ends this server through should_exit

    holder: list[uvicorn.Server] = []
    app = build_app(config, EngineClient(addrs), request_exit=lambda: setattr(holder[0], "should_exit", True))
    holder.append(Server(uvicorn.Config(
        app, host=config.host, port=config.port, loop="uvloop", log_config=None,
        log_level=config.log_level.lower(), access_log=config.access_log, timeout_graceful_shutdown=3,
        timeout_keep_alive=30)))
    holder[0].run()


def build_app(config: ServerConfig, client: EngineClient, request_exit: Callable[[], None] | None = None) -> FastAPI:
    state = ServerState(config, client)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        tasks: set[asyncio.Task] = set()

        def on_drain(timeout_s: float) -> None:
            if not state.draining:
                tasks.add(asyncio.create_task(drain(state, timeout_s, request_exit)))

        client.on_drain = on_drain  # before the reader starts: a Drain may be the first message
        await client.start()
        loader = asyncio.create_task(_load_tokenizer(state))
        try:
            yield
        finally:
            loader.cancel()
            state.executor.shutdown(wait=False, cancel_futures=True)
            await client.close()

    # No /docs or /redoc: their pages load scripts from a CDN; /openapi.json serves clients and fuzzers.
    app = FastAPI(title="Kestrel", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible LLM server. /health, /metrics, /dashboard and /version are "
                              "open; with an API key, every other route needs `Authorization: Bearer <key>`.")
    app.state.kestrel = state
    install_error_handlers(app)
    open_obs, protected_obs = observability_routes(state)
    checker = [Depends(_api_key_checker(config.api_key))]
    app.include_router(_open_routes(state))
    app.include_router(open_obs)
    app.include_router(_protected_routes(state), dependencies=checker)
    app.include_router(protected_obs, dependencies=checker)
    install_openapi(app, [ChatCompletionRequest, CompletionRequest, GenerateRequest])
    app.add_middleware(AdmissionMiddleware, state=state)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_body_bytes)
    return app


async def drain(state: ServerState, timeout_s: float, request_exit: Callable[[], None] | None) -> None:
    """Refuse new calls, wait for those in flight (failing them at the deadline), then exit."""
    state.draining = True
    logger.info("draining: %d calls in flight, waiting up to %.0f s", state.num_active_calls, timeout_s)
    await _wait_for_calls(state, timeout_s)
    if state.num_active_calls:
        logger.warning("shutdown timeout: failing the %d calls still in flight", state.num_active_calls)
        state.client.fail_all(EngineError("the server is shutting down (--shutdown-timeout passed)", 503))
        await _wait_for_calls(state, _FAIL_FLUSH_S)
    logger.info("drained; the API process stops")
    if request_exit is not None:
        request_exit()


async def _wait_for_calls(state: ServerState, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while state.num_active_calls and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _load_tokenizer(state: ServerState) -> None:
    from kestrel.frontend.tokenizer import load_tokenizer

    try:
        state.tokenizer = await asyncio.to_thread(load_tokenizer, state.config.tokenizer_path)
    except Exception:
        logger.exception("cannot load the tokenizer from %s", state.config.tokenizer_path)
        state.tokenizer_error = "the tokenizer could not be loaded (the server log has the details)"
        return
    logger.info("tokenizer loaded from %s", state.config.tokenizer_path)
    if "torch" in sys.modules:
        logger.warning("torch got imported into the API process; it should stay in the engine process")


def _api_key_checker(api_key: str | None):
    expected = api_key.encode() if api_key is not None else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError("Invalid or missing API key: send 'Authorization: Bearer <key>'.", 401,
                           code="invalid_api_key")

    return check


def _open_routes(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/health", response_model=HealthResponse,
                responses={503: {"model": HealthResponse,
                                 "description": "Loading, restarting, draining, stalled or dead."}})
    async def health() -> Response:
        status, detail = state.health()
        if status == "ok":
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": status, "detail": detail}, status_code=503)

    @router.get("/version", response_model=VersionResponse)
    async def version() -> dict:
        return {"version": __version__}

    return router


def _protected_routes(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models", **route_docs(ModelList, errors=(401,)))
    async def models() -> Response:
        info = state.client.engine_info
        cards = [ModelCard(id=name, root=name, max_model_len=info.max_model_len if info else None)
                 for name in state.config.served_model_names]
        return Response(ModelList(data=cards).model_dump_json(), media_type="application/json")

    @router.post("/v1/chat/completions", **route_docs(ChatCompletionResponse, ChatCompletionRequest,
                                                      GENERATING_ERRORS, streams=True))
    async def chat_completions(request: Request) -> Response:
        return await openai_serving.create_chat_completion(state, request)

    @router.post("/v1/completions", **route_docs(CompletionResponse, CompletionRequest, GENERATING_ERRORS,
                                                 streams=True))
    async def completions(request: Request) -> Response:
        return await openai_serving.create_completion(state, request)

    @router.post("/generate", **route_docs(GenerateResult | list[GenerateResult], GenerateRequest,
                                           GENERATING_ERRORS, streams=True))
    async def generate(request: Request) -> Response:
        return await native.generate(state, request)

    @router.get("/debug/state", **route_docs(dict, errors=(401, 503)))
    async def debug_state() -> dict:
        """KV occupancy and integrity from the engine, and this process's own bookkeeping."""
        state.check_ready()
        try:
            stats = await state.client.get_stats()
        except (EngineError, asyncio.TimeoutError) as e:
            raise APIError(f"the engine did not answer: {e}", 503) from None
        return {"engine": {"num_free_slots": stats.num_free_slots, "num_slots": stats.num_slots,
                           "num_unfinished_requests": stats.num_unfinished_requests,
                           "integrity_ok": stats.integrity_ok, "integrity_error": stats.integrity_error,
                           "num_cached_slots": stats.num_cached_slots,
                           "num_prefix_queried_tokens": stats.num_prefix_queried_tokens,
                           "num_prefix_hit_tokens": stats.num_prefix_hit_tokens,
                           "prefix_cache_hit_rate": stats.prefix_cache_hit_rate},
                "api": {"num_in_flight_requests": state.client.num_in_flight,
                        "torch_imported": "torch" in sys.modules}}

    return router
