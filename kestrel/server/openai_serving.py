"""POST /v1/chat/completions and POST /v1/completions: OpenAI requests in, OpenAI replies out.

Each handler: parse and check the request -> tokenize (chat template for chat), off the event
loop -> validated SamplingParams -> submit n engine requests per prompt -> collect them into one
response, or stream them as server-sent events (`data: {...}` chunks, `data: [DONE]` last, a usage
chunk when `stream_options.include_usage`). Usage reports `prompt_tokens_details.cached_tokens`: the
prompt tokens the prefix cache supplied. A chat longer than the context is a 400 naming both
lengths, or, with `--truncate-chat-history` (or the request's `truncate_chat_history`), loses its
oldest turns after the system message (header `X-Kestrel-Dropped-Messages`). A chat template's error
reaches the client only when the template raised it on purpose (`raise_exception`); anything else is
a generic 400. No torch here.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response
from jinja2 import TemplateError

from kestrel.messages import PositionLogprobs
from kestrel.server.client import RequestGroup
from kestrel.server.errors import APIError
from kestrel.messages import TextDelta
from kestrel.server.protocol import (ChatChoiceLogprobs, ChatCompletionChoice, ChatCompletionChunk,
                                     ChatCompletionRequest, ChatCompletionResponse,
                                     ChatStreamChoice, ChatTokenLogprob, ChatTopLogprob, CompletionChoice,
                                     CompletionLogprobs, CompletionRequest, CompletionResponse, DeltaMessage,
                                     PromptTokensDetails, SamplingRequest, UsageInfo)
from kestrel.server.serving import (Choice, ClientGone, ServerState, SSEResponse, arrival_time, check_token_ids,
                                    client_gone_response, collect, encode_text, make_sampling_params, parse_body,
                                    sse, submit, until_disconnect, wait_accepted)
from kestrel.server.structured import openai_constraint
from kestrel.server.tool_answers import ToolStream, chat_message as _chat_message
from kestrel.server.tools import ToolPlan, plan_tools, template_messages

logger = logging.getLogger(__name__)

_MIN_LOGPROB = -9999.0
"""JSON has no -inf; impossible tokens report this instead (as vLLM does)."""


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    req = await parse_body(state, request, ChatCompletionRequest)
    _check_common(state, req)
    if not req.messages:
        raise APIError("'messages' must not be empty: give at least one message", param="messages")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
    template = getattr(state.tokenizer, "chat_template", None)
    plan = plan_tools(req, state.config.tool_call_parser, template)
    constraint = openai_constraint(req, plan.constraint)
    uses_completion_name = req.max_completion_tokens is not None
    max_tokens = req.max_completion_tokens if uses_completion_name else req.max_tokens
    prompt_ids, num_dropped = await state.run_blocking(_render_chat, state, req, plan, max_tokens)
    headers = {"X-Kestrel-Dropped-Messages": str(num_dropped)} if num_dropped else {}
    renames = {"logprobs": "top_logprobs"}
    if uses_completion_name:
        renames["max_tokens"] = "max_completion_tokens"
    num_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = make_sampling_params(state, [len(prompt_ids)], max_tokens, renames, "messages",
                                  logprobs=num_logprobs, structured_outputs=constraint, **_sampling_kwargs(req))
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    group = await submit(state, request_id, [prompt_ids], params, arrival_time(request))
    usage = _Usage(len(prompt_ids), params.n)
    if req.stream:
        if constraint is not None:
            await wait_accepted(group)
        opts = req.stream_options
        return SSEResponse(_chat_stream(state, request_id, group, usage, bool(opts and opts.include_usage),
                                        bool(opts and opts.continuous_usage_stats), plan), group, headers)
    try:
        choices = await until_disconnect(request, collect(group, params.n))
    except ClientGone:
        return client_gone_response()
    out = [ChatCompletionChoice(index=i, message=message, finish_reason=finish,
                                logprobs=_chat_logprobs(c.logprobs) if num_logprobs is not None else None,
                                stop_reason=c.stop_reason)
           for i, c in enumerate(choices) for message, finish in [_chat_message(c, plan)]]
    usage.add_choices(choices)
    return _json(ChatCompletionResponse(id=request_id, model=state.config.model_name, choices=out,
                                        usage=usage.info()), headers)


async def create_completion(state: ServerState, request: Request) -> Response:
    req = await parse_body(state, request, CompletionRequest)
    _check_common(state, req)
    if req.suffix:
        raise APIError("'suffix' is not supported", param="suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise APIError("'best_of' is not supported (it must equal n)", param="best_of")
    if req.echo and req.logprobs is not None:
        raise APIError("'echo' together with 'logprobs' is not supported (no prompt logprobs yet)", param="echo")
    texts, prompts = await state.run_blocking(_encode_prompts, state, req.prompt)
    constraint = openai_constraint(req)
    params = make_sampling_params(state, [len(p) for p in prompts], 16 if req.max_tokens is None else req.max_tokens,
                                  {}, "prompt", logprobs=req.logprobs, structured_outputs=constraint,
                                  **_sampling_kwargs(req))
    request_id = f"cmpl-{uuid.uuid4().hex}"
    group = await submit(state, request_id, prompts, params, arrival_time(request))
    usage = _Usage(sum(len(p) for p in prompts), params.n)
    echo = [texts[i // params.n] if req.echo else "" for i in range(len(prompts) * params.n)]
    if req.stream:
        if constraint is not None:
            await wait_accepted(group)
        opts = req.stream_options
        return SSEResponse(_completion_stream(state, request_id, group, usage, echo, req.logprobs is not None,
                                              bool(opts and opts.include_usage),
                                              bool(opts and opts.continuous_usage_stats)), group)
    try:
        choices = await until_disconnect(request, collect(group, len(echo)))
    except ClientGone:
        return client_gone_response()
    out = [CompletionChoice(index=i, text=echo[i] + c.text,
                            logprobs=_completion_logprobs(c.logprobs, 0) if req.logprobs is not None else None,
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason)
           for i, c in enumerate(choices)]
    usage.add_choices(choices)
    return _json(CompletionResponse(id=request_id, model=state.config.model_name, choices=out,
                                    usage=usage.info()))


# ---- request checks and tokenizing ----------------------------------------------------
def _check_common(state: ServerState, req: SamplingRequest) -> None:
    state.check_model(req.model)
    state.check_ready()
    if req.logit_bias:
        raise APIError("'logit_bias' is not supported", param="logit_bias")
    if req.stream_options is not None and not req.stream:
        raise APIError("'stream_options' is only allowed when 'stream' is true", param="stream_options")


def _sampling_kwargs(req: SamplingRequest) -> dict:
    """The SamplingParams arguments every OpenAI request shares (None -> the default)."""
    given = dict(n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                 presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                 repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop,
                 stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                 skip_special_tokens=req.skip_special_tokens,
                 include_stop_str_in_output=req.include_stop_str_in_output)
    return {k: v for k, v in given.items() if v is not None}


def _render_chat(state: ServerState, req: ChatCompletionRequest, plan: ToolPlan,
                 max_tokens: int | None) -> tuple[list[int], int]:
    """(prompt token ids, messages dropped to fit the context: only with --truncate-chat-history)."""
    from kestrel.frontend.chat_history import fit_conversation
    from kestrel.frontend.tokenizer import apply_chat_template  # imports transformers: keep it lazy

    template = getattr(state.tokenizer, "chat_template", None)
    messages = template_messages([m.as_template_dict() for m in req.messages], plan, template)
    kwargs = dict(req.chat_template_kwargs or {})
    if plan.tools:
        kwargs["tools"] = plan.tools
    if not template:
        raise APIError("this model has no chat template: use /v1/completions with a plain prompt", param="messages")

    def render(msgs: list[dict]) -> list[int]:
        try:
            return apply_chat_template(state.tokenizer, msgs, req.add_generation_prompt is not False, **kwargs)
        except Exception as e:  # the messages (or chat_template_kwargs) are the request's: a 400
            logger.debug("chat template failed", exc_info=True)
            # raise_exception() in a template raises a plain TemplateError whose text is meant for users;
            # any other error would show Python or Jinja internals.
            detail = str(e) if type(e) is TemplateError else ("check the roles, their order and the content "
                                                              "of each message")
            raise APIError(f"the chat template cannot render these 'messages': {detail}", param="messages") from None

    truncate = req.truncate_chat_history
    if not (state.config.truncate_chat_history if truncate is None else truncate):
        return render(messages), 0
    limit = state.max_model_len
    return fit_conversation(messages, render, lambda n: n < limit and (max_tokens is None or n + max_tokens <= limit))


def _encode_prompts(state: ServerState, prompt) -> tuple[list[str], list[list[int]]]:
    """(text, token ids) of each prompt: a string, strings, token ids or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt], [encode_text(state, prompt, "prompt")]
    if not prompt:
        raise APIError("'prompt' must not be empty", param="prompt")
    if isinstance(prompt[0], str):
        return list(prompt), [encode_text(state, p, "prompt") for p in prompt]
    batch = [prompt] if isinstance(prompt[0], int) else prompt
    for ids in batch:
        check_token_ids(state, ids, "prompt")
    return [state.tokenizer.decode(ids) for ids in batch], [list(ids) for ids in batch]


# ---- streaming ------------------------------------------------------------------------
class _Usage:
    """Token counts of one call, updated as deltas arrive.

    Cached tokens count once per prompt, like its prompt tokens: the fewest of its n completions
    (the first one computes what the others then find cached).
    """

    def __init__(self, prompt_tokens: int, n: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.n = n
        self._cached: dict[int, int] = {}
        """choice index -> its cached prompt tokens."""

    def add(self, index: int, delta: TextDelta) -> None:
        self.completion_tokens += len(delta.token_ids)
        self._cached[index] = delta.num_cached_tokens

    def add_choices(self, choices: list[Choice]) -> None:
        self.completion_tokens = sum(len(c.token_ids) for c in choices)
        self._cached = {i: c.num_cached_tokens for i, c in enumerate(choices)}

    def info(self) -> UsageInfo:
        per_prompt: dict[int, int] = {}
        for index, cached in self._cached.items():
            prompt = index // self.n
            per_prompt[prompt] = min(per_prompt.get(prompt, cached), cached)
        return UsageInfo(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                         total_tokens=self.prompt_tokens + self.completion_tokens,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(per_prompt.values())))


async def _chat_stream(state: ServerState, request_id: str, group: RequestGroup, usage: _Usage,
                       include_usage: bool, continuous_usage: bool, plan: ToolPlan) -> AsyncIterator[str]:
    model, created = state.config.model_name, int(time.time())
    started: set[int] = set()
    tool_streams: dict[int, ToolStream] = {}
    async for index, delta in group:
        usage.add(index, delta)
        running = usage.info() if continuous_usage else None
        if index not in started:
            started.add(index)
            first = ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
            yield sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[first],
                                          usage=running))
        text, calls, finish = delta.text, None, delta.finish_reason
        if plan.fmt is not None:
            stream = tool_streams.setdefault(index, ToolStream(plan.fmt))
            text, calls, finish = stream.feed(delta.text, delta.finish_reason)
        if not (text or calls or finish or delta.logprobs):
            continue
        choice = ChatStreamChoice(index=index, delta=DeltaMessage(content=text if text or not calls else None,
                                                                  tool_calls=calls),
                                  logprobs=_chat_logprobs(delta.logprobs) if delta.logprobs else None,
                                  finish_reason=finish, stop_reason=delta.stop_reason)
        yield sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice],
                                      usage=running))
    if include_usage:
        yield sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                      usage=usage.info()))

async def _completion_stream(state: ServerState, request_id: str, group: RequestGroup, usage: _Usage,
                             echo: list[str], want_logprobs: bool, include_usage: bool,
                             continuous_usage: bool) -> AsyncIterator[str]:
    model, created = state.config.model_name, int(time.time())
    offsets = [len(e) for e in echo]
    async for index, delta in group:
        usage.add(index, delta)
        text = delta.text
        if echo[index]:
            text, echo[index] = echo[index] + text, ""
        if not (text or delta.finish_reason or delta.logprobs):
            continue
        logprobs = None
        if want_logprobs and delta.logprobs:
            logprobs = _completion_logprobs(delta.logprobs, offsets[index])
            offsets[index] += sum(len(p.chosen.token) for p in delta.logprobs)
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason,
                                  stop_reason=delta.stop_reason)
        yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[choice],
                                     usage=usage.info() if continuous_usage else None))
    if include_usage:
        yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[],
                                     usage=usage.info()))


# ---- response shaping ------------------------------------------------------------------
def _chat_logprobs(positions: list[PositionLogprobs]) -> ChatChoiceLogprobs:
    content = []
    for p in positions:
        top = [ChatTopLogprob(token=t.token, logprob=max(t.logprob, _MIN_LOGPROB), bytes=list(t.token.encode()))
               for t in p.top]
        content.append(ChatTokenLogprob(token=p.chosen.token, logprob=max(p.chosen.logprob, _MIN_LOGPROB),
                                        bytes=list(p.chosen.token.encode()), top_logprobs=top))
    return ChatChoiceLogprobs(content=content)


def _completion_logprobs(positions: list[PositionLogprobs], offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for p in positions:
        out.text_offset.append(offset)
        offset += len(p.chosen.token)
        out.tokens.append(p.chosen.token)
        out.token_logprobs.append(max(p.chosen.logprob, _MIN_LOGPROB))
        top = {p.chosen.token: max(p.chosen.logprob, _MIN_LOGPROB)}
        top.update({t.token: max(t.logprob, _MIN_LOGPROB) for t in p.top})
        out.top_logprobs.append(top)
    return out


def _json(model, headers: dict[str, str] | None = None) -> Response:
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)
