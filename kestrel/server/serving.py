"""What every generating endpoint of the API process shares: parsing, checks, submission, streaming.

`ServerState` is the API process's view of the world (config, engine client, tokenizer once
loaded). The helpers below turn a parsed request into validated `SamplingParams` (context-length
checks included), submit the engine requests of one call, collect or stream what comes back, and
abort it all if the HTTP client goes away. No torch here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
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

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)
T = TypeVar("T")

@dataclass(slots=True)
class ServerState:
    """Everything the API process's handlers need."""

    config: ServerConfig
    client: EngineClient
    tokenizer: object | None = None
    """The model's tokenizer, once loaded (in a thread, while /health answers 503)."""
    tokenizer_error: str | None = None

    @property
    def is_ready(self) -> bool:
        return (self.tokenizer is not None and self.client.engine_info is not None
                and self.client.dead_reason is None)

    @property
    def not_ready_reason(self) -> str:
        if self.client.dead_reason is not None:
            return self.client.dead_reason
        if self.tokenizer_error is not None:
            return self.tokenizer_error
        return "the model is still loading; retry when GET /health answers 200"

    def check_ready(self) -> None:
        if not self.is_ready:
            raise APIError(self.not_ready_reason, 503, code="not_ready")

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


async def parse_body(request: Request, model: type[ModelT]) -> ModelT:
    """Parse and type-check a JSON body; 400 naming the parameter when it is wrong."""
    body = await request.body()
    try:
        return model.model_validate_json(body or b"")
    except pydantic.ValidationError as e:
        raise from_validation_error(e) from None


def make_sampling_params(state: ServerState, prompt_lens: list[int], max_tokens: int | None,
                         renames: dict[str, str], prompt_param: str, **kwargs) -> SamplingParams:
    """Validated SamplingParams for prompts of these lengths; 400 naming the parameter otherwise.

    `renames` maps SamplingParams names to this endpoint's (max_tokens -> max_completion_tokens).
    """
    try:
        params = SamplingParams(max_tokens=max_tokens, **kwargs)
    except ValueError as e:
        raise from_value_error(e, renames) from None
    for prompt_len in prompt_lens:
        try:
            state.limits.check_len(prompt_len, max_tokens, prompt_param, renames.get("max_tokens", "max_tokens"))
        except PromptError as e:
            raise APIError(str(e), param=e.param, code=e.code) from None
    return params


def check_token_ids(state: ServerState, ids: list[int], param: str) -> None:
    try:
        state.limits.check_token_ids(ids, param)
    except PromptError as e:
        raise APIError(str(e), param=e.param, code=e.code) from None


async def submit(state: ServerState, base_id: str, prompts: list[list[int]],
                 params: SamplingParams) -> RequestGroup:
    """Start n engine requests per prompt; choice index = prompt index * n + i, seeds seed + i."""
    requests = [EngineRequest(p * params.n + i, ids, params.for_completion(i))
                for p, ids in enumerate(prompts) for i in range(params.n)]
    try:
        return await state.client.generate(base_id, requests)
    except EngineError as e:
        raise APIError(str(e), e.status_code) from None


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

    `group.close()` runs even if the generator never started (client gone before the headers).
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], group: RequestGroup, headers: dict[str, str] | None = None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._group = group

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self._group.close()


def sse(model: pydantic.BaseModel | dict) -> str:
    """One server-sent event carrying a JSON body."""
    body = model.model_dump_json() if isinstance(model, pydantic.BaseModel) else json.dumps(model)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"
