"""The API process: a FastAPI app on uvicorn (uvloop) in front of the engine and detokenizer.

Routes: POST /v1/chat/completions, POST /v1/completions, POST /generate, GET /v1/models,
GET /health (503 until the model and tokenizer are loaded, and again if a server process dies),
GET /version, GET /debug/state (KV slots free/cached/total, prefix-cache hit rate, last integrity check,
requests in flight).
With `api_key` set, /v1, /generate and /debug need `Authorization: Bearer <key>`.

This process tokenizes, applies chat templates and speaks HTTP; it never imports torch (the
engine process owns the model). Input/output: HTTP on one side, ZMQ (`client.EngineClient`) on
the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import logging
import sys

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kestrel.server import generate as native
from kestrel.server import openai_serving
from kestrel.server.child import init_child_process
from kestrel.server.client import EngineClient, EngineError
from kestrel.server.config import IpcAddresses, ServerConfig
from kestrel.server.errors import APIError, install_error_handlers
from kestrel.server.protocol import ModelCard, ModelList
from kestrel.server.serving import ServerState

logger = logging.getLogger(__name__)


def _package_version() -> str:
    # Not `kestrel.__version__`: importing the package root would pull in `kestrel.llm` (torch).
    try:
        return importlib.metadata.version("kestrel")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


__version__ = _package_version()


def run_api_process(config: ServerConfig, addrs: IpcAddresses) -> None:
    """Process entry point: serve HTTP until SIGTERM (sent by the supervisor)."""
    init_child_process("api", config.log_level)
    import uvicorn

    app = build_app(config, EngineClient(addrs))
    uvicorn.run(app, host=config.host, port=config.port, loop="uvloop", log_config=None,
                log_level=config.log_level.lower(),
                access_log=config.access_log, timeout_graceful_shutdown=3, timeout_keep_alive=30)


def build_app(config: ServerConfig, client: EngineClient) -> FastAPI:
    state = ServerState(config, client)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await client.start()
        loader = asyncio.create_task(_load_tokenizer(state))
        try:
            yield
        finally:
            loader.cancel()
            await client.close()

    app = FastAPI(title="Kestrel", version=__version__, lifespan=lifespan)
    app.state.kestrel = state
    install_error_handlers(app)
    app.include_router(_open_routes(state))
    app.include_router(_protected_routes(state), dependencies=[Depends(_api_key_checker(config.api_key))])
    return app


async def _load_tokenizer(state: ServerState) -> None:
    from kestrel.frontend.tokenizer import load_tokenizer

    try:
        state.tokenizer = await asyncio.to_thread(load_tokenizer, state.config.tokenizer_path)
    except Exception as e:
        state.tokenizer_error = f"cannot load the tokenizer: {e}"
        logger.error("%s", state.tokenizer_error)
        return
    logger.info("tokenizer loaded from %s", state.config.tokenizer_path)
    if "torch" in sys.modules:
        logger.warning("torch got imported into the API process; it should stay in the engine process")


def _api_key_checker(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError("Invalid or missing API key: send 'Authorization: Bearer <key>'.", 401,
                           code="invalid_api_key")

    return check


def _open_routes(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        if state.is_ready:
            return JSONResponse({"status": "ok"})
        status = "dead" if state.client.dead_reason or state.tokenizer_error else "loading"
        return JSONResponse({"status": status, "detail": state.not_ready_reason}, status_code=503)

    @router.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    return router


def _protected_routes(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def models() -> Response:
        info = state.client.engine_info
        cards = [ModelCard(id=name, root=info.model_path if info else None,
                           max_model_len=info.max_model_len if info else None)
                 for name in state.config.served_model_names]
        return Response(ModelList(data=cards).model_dump_json(), media_type="application/json")

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await openai_serving.create_chat_completion(state, request)

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await openai_serving.create_completion(state, request)

    @router.post("/generate")
    async def generate(request: Request) -> Response:
        return await native.generate(state, request)

    @router.get("/debug/state")
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
