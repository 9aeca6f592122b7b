"""What every generating endpoint of the API process shares: parsing, checks, submission, streaming.

`ServerState` is the API process's view of the world (config, engine client, tokenizer once
loaded, request statistics, whether it drains) and tells /health the truth (`health()`). The
helpers below parse bodies and tokenize off the event loop (`run_blocking`, a small thread pool,
so /health answers while a large prompt is tokenized), turn a parsed request into validated
`SamplingParams` (context-length checks included), submit the engine requests of one call
(503 + Retry-After beyond `--max-queued-requests`; `--request-timeout` as the group's deadline),
collect or stream what comes back, and abort it all if the HTTP client goes away. No torch here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import pydantic
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from kestrel.limits import PromptError, PromptLimits
from kestrel.messages import PositionLogprobs, TextDelta
from kestrel.sampling_params import SamplingParams
from kestrel.server.client import EngineClient, EngineError, EngineRequest, RequestGroup
from kestrel.server.config import ServerConfig
from kestrel.server.errors import APIError, from_validation_error, from_value_error
from kestrel.server.request_stats import FrontendStats

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)
T = TypeVar("T")

RETRY_AFTER = {"Retry-After": "5"}
_MAX_ENGINE_REQUESTS_PER_CALL = 1024
"""Prompts x n of one call."""
_THREAD_PARSE_BYTES = 256 * 1024
"""Bodies at least this large are parsed off the event loop."""


@dataclass(slots=True)
class ServerState:
    """Everything the API process's handlers need."""

    config: ServerConfig
    client: EngineClient
    tokenizer: object | None = None
    """The model's tokenizer, once loaded (in a thread, while /health answers 503)."""
    tokenizer_error: str | None = None
    """Why the tokenizer did not load, phrased for a response (the log has the details)."""
    stats: FrontendStats | None = None
    draining: bool = False
    """A Drain arrived: new requests get 503, the process exits when those in flight are done."""
    num_active_calls: int = 0
    """Generating HTTP calls whose response is not fully sent (counted by `AdmissionMiddleware`)."""
    started_at: float = field(default_factory=time.monotonic)
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="kestrel-tokenize"))
    """Tokenizing, chat templates and parsing large bodies run here, off the event loop."""

    def __post_init__(self) -> None:
        if self.stats is None:
            self.stats = FrontendStats(self.config.model_name)

    def health(self) -> tuple[str, str | None]:
        """("ok", None) or (status, what is wrong): dead, restarting, loading, draining or stalled."""
        client = self.client
        if client.dead_reason is not None:
            return ("restarting" if client.is_restarting else "dead"), client.dead_reason
        if self.tokenizer_error is not None:
            return "dead", self.tokenizer_error
        if self.tokenizer is None or client.engine_info is None:
            return "loading", "the model is still loading; retry when GET /health answers 200"
        if self.draining:
            return "draining", "the server is shutting down and accepts no new requests"
        stall_timeout = self.config.stall_timeout_s
        stalled_for = client.seconds_without_progress()
        if stall_timeout and stalled_for > stall_timeout:
            return "stalled", (f"the engine has had work but made no step for {stalled_for:.0f} s "
                               f"(--stall-timeout {stall_timeout:g})")
        return "ok", None

    def check_ready(self) -> None:
        status, detail = self.health()
        if status not in ("ok", "stalled"):
            raise APIError(detail or status, 503, code="not_ready", headers=RETRY_AFTER)

    async def run_blocking(self, fn: Callable[..., T], *args) -> T:
        """Run `fn(*args)` in the tokenizer threads; the event loop keeps serving meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.config.served_model_names:
            raise APIError(f"The model '{model}' does not exist; this server serves "
                           f"{', '.join(repr(m) for m in self.config.served_model_names)}.",
                           404, param="model", code="model_not_found")

    @property
    def max_model_len(self) -> int:
        assert self.client.engine_info is not None
        return self.client.engine_info.max_model_len

    @property
    def limits(self) -> PromptLimits:
        info = self.client.engine_info
        assert info is not None
        return PromptLimits(info.max_model_len, info.vocab_size)


async def parse_body(state: ServerState, request: Request, model: type[ModelT]) -> ModelT:
    """Parse and type-check a JSON body (a large one off the event loop); 400 naming the parameter."""
    body = await request.body()
    try:
        if len(body) >= _THREAD_PARSE_BYTES:
            return await state.run_blocking(model.model_validate_json, body)
        return model.model_validate_json(body or b"")
    except pydantic.ValidationError as e:
        raise from_validation_error(e) from None


def arrival_time(request: Request) -> float:
    """When the HTTP request arrived (time.monotonic(), stamped by `AdmissionMiddleware`)."""
    return request.scope.get("kestrel.arrival") or time.monotonic()


def make_sampling_params(state: ServerState, prompt_lens: list[int], max_tokens: int | None,
                         renames: dict[str, str], prompt_param: str, **kwargs) -> SamplingParams:
    """Validated SamplingParams for prompts of these lengths; 400 naming the parameter otherwise.

    `renames` maps SamplingParams names to this endpoint's (max_tokens -> max_completion_tokens).
    """
    try:
        params = SamplingParams(max_tokens=max_tokens, **kwargs)
    except ValueError as e:
        raise from_value_error(e, renames) from None
    if len(prompt_lens) * params.n > _MAX_ENGINE_REQUESTS_PER_CALL:
        raise APIError(f"{len(prompt_lens)} prompts x n={params.n} is more than the "
                       f"{_MAX_ENGINE_REQUESTS_PER_CALL} completions one call may ask for", param=renames.get("n", "n"))
    for prompt_len in prompt_lens:
        try:
            state.limits.check_len(prompt_len, max_tokens, prompt_param, renames.get("max_tokens", "max_tokens"))
        except PromptError as e:
            raise APIError(str(e), param=e.param, code=e.code) from None
    return params


def encode_text(state: ServerState, text: str, param: str) -> list[int]:
    """Token ids of a prompt text (call it off the event loop); 400 naming `param` if it cannot be."""
    try:
        return state.tokenizer.encode(text)
    except Exception:  # e.g. a lone surrogate the tokenizer cannot take
        logger.debug("cannot tokenize a prompt", exc_info=True)
        raise APIError(f"'{param}' cannot be tokenized (is it valid Unicode text?)", param=param) from None


def check_token_ids(state: ServerState, ids: list[int], param: str) -> None:
    try:
        state.limits.check_token_ids(ids, param)
    except PromptError as e:
        raise APIError(str(e), param=e.param, code=e.code) from None


async def submit(state: ServerState, base_id: str, prompts: list[list[int]],
                 params: SamplingParams, arrival: float) -> RequestGroup:
    """Start n engine requests per prompt; choice index = prompt index * n + i, seeds seed + i."""
    requests = [EngineRequest(p * params.n + i, ids, params.for_completion(i))
                for p, ids in enumerate(prompts) for i in range(params.n)]
    _check_queue(state, len(requests))
    timeout = state.config.request_timeout_s
    if state.config.log_requests:
        logger.info("request %s: prompts %r, params %s", base_id,
                    [state.tokenizer.decode(p[:_LOGGED_TOKENS]) for p in prompts], params)
    try:
        return await state.client.generate(base_id, requests, None if timeout is None else arrival + timeout,
                                           state.stats.observe(arrival))
    except EngineError as e:
        raise APIError(str(e), e.status_code, headers=RETRY_AFTER if e.status_code == 503 else None) from None


_LOGGED_TOKENS = 256
"""How much of each prompt --log-requests shows (tokens)."""


def _check_queue(state: ServerState, num_new: int) -> None:
    """503 + Retry-After when admitting `num_new` engine requests would pass --max-queued-requests."""
    limit = state.config.max_queued_requests
    info = state.client.engine_info
    if limit is None or info is None:
        return
    capacity = info.max_num_seqs + limit
    if num_new > capacity:  # it would never fit: retrying cannot help
        raise APIError(f"this call asks for {num_new} completions (prompts x n); this server admits at most "
                       f"{capacity} at once", param="n")
    if state.client.num_in_flight + num_new > capacity:
        raise APIError(f"the server is at capacity ({capacity} requests admitted: --max-num-seqs "
                       f"{info.max_num_seqs} + --max-queued-requests {limit}); retry later",
                       503, code="server_overloaded", headers={"Retry-After": "1"})


@dataclass(slots=True)
class Choice:
    """One completion being assembled from its deltas."""

    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""

    def add(self, delta: TextDelta) -> None:
        self.num_cached_tokens = delta.num_cached_tokens
        if delta.text:
            self.text_parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


async def collect(group: RequestGroup, num_choices: int) -> list[Choice]:
    """Wait for every request of the group; EngineError becomes an APIError."""
    choices = [Choice() for _ in range(num_choices)]
    try:
        async for index, delta in group:
            choices[index].add(delta)
    except EngineError as e:
        raise APIError(str(e), e.status_code, param=e.param) from None
    finally:
        group.close()
    return choices


async def wait_accepted(group: RequestGroup) -> None:
    """Before a stream commits to 200: wait for the engine to accept the group (e.g. compile its grammar)."""
    try:
        await group.wait_first()
    except EngineError as e:
        group.close()
        raise APIError(str(e), e.status_code, param=e.param) from None


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the HTTP client disconnects first, cancel it (its finally blocks abort)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def client_gone_response() -> Response:
    """What a handler returns once its client left (nobody reads it)."""
    return Response(status_code=499)


class SSEResponse(StreamingResponse):
    """A `text/event-stream` response that always ends its requests, however the stream ends.

    `content` yields the events; an `EngineError` it raises becomes an error event, `data: [DONE]`
    comes last, and `group.close()` runs even if the generator never started (client gone before
    the headers).
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], group: RequestGroup,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(_events_then_done(content, group),
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._group = group

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self._group.close()


async def _events_then_done(content: AsyncIterator[str], group: RequestGroup) -> AsyncIterator[str]:
    try:
        async with contextlib.aclosing(content):
            async for event in content:
                yield event
    except EngineError as e:
        yield sse(APIError(str(e), e.status_code).to_body())
    finally:
        group.close()
    yield SSE_DONE


def sse(model: pydantic.BaseModel | dict) -> str:
    """One server-sent event carrying a JSON body."""
    body = model.model_dump_json() if isinstance(model, pydantic.BaseModel) else json.dumps(model)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"
