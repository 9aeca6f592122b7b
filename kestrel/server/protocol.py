"""Pydantic models of the HTTP API: OpenAI chat/completions, the native /generate, and their replies.

Request models are strict (a string is not a number, a number is not a boolean) and are parsed from
the raw body with `model_validate_json`, so every malformed or mistyped body becomes one
`pydantic.ValidationError` that `errors.py` turns into a 400 naming the parameter. Unknown fields
are ignored, as OpenAI-compatible servers usually do. Range checks live in `SamplingParams`, not
here, so the offline API and the server say the same thing. No torch here.
"""

from __future__ import annotations

import time
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests ------------------------------------------------------------------------
class StreamOptions(_Request):
    include_usage: bool | None = False
    """Send a last chunk with `usage` (and empty `choices`)."""
    continuous_usage_stats: bool | None = False
    """Put the running `usage` in every chunk (vLLM extension)."""


class JsonSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict | bool | None = Field(None, alias="schema")
    strict: bool | None = None
    """Accepted and always honoured: constrained output matches the schema."""


class ResponseFormat(_Request):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Request):
    """vLLM's `structured_outputs` object; fields Kestrel cannot honour are refused (extra="forbid")."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    json_: dict | bool | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | dict | None = None


class StructuredFields(_Request):
    """Every way a request can constrain its output (OpenAI, vLLM and vLLM's older `guided_*` names)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    """Accepted when empty or "xgrammar" (the only backend)."""
    guided_whitespace_pattern: str | None = None
    """Not supported: refused when set."""


class SamplingRequest(StructuredFields):
    """Fields shared by /v1/chat/completions and /v1/completions (OpenAI names + vLLM extensions)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    """Accepted only when empty: Kestrel cannot bias logits yet."""
    # vLLM extensions (the openai client sends them through `extra_body`)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = 0
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    """Required, except for an assistant message with tool_calls (as OpenAI has it)."""
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("'content' is required (it may be null only in an assistant message with "
                             "'tool_calls')")
        return self

    def as_template_dict(self) -> dict:
        """The message as chat templates expect it: content as one string."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        out: dict = {"role": self.role, "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool | None = True
    chat_template_kwargs: dict | None = None
    truncate_chat_history: bool | None = None
    """Kestrel extension: drop the oldest turns (after the system message) of a chat longer than the
    context instead of failing; None means the server's --truncate-chat-history."""


PromptInput = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(SamplingRequest):
    prompt: PromptInput
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class GenerateSamplingParams(_Request):
    """SGLang's sampling_params names."""

    max_new_tokens: int | None = 128
    min_new_tokens: int | None = 0
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = -1
    min_p: float | None = 0.0
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    repetition_penalty: float | None = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    no_stop_trim: bool | None = False
    """Keep the matched stop string in the text."""
    n: int | None = 1
    sampling_seed: int | None = None
    seed: int | None = None
    regex: str | None = None
    json_schema: str | None = None
    """A JSON schema as JSON text (SGLang's form)."""
    ebnf: str | None = None


class GenerateRequest(_Request):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: GenerateSamplingParams = Field(default_factory=GenerateSamplingParams)
    stream: bool | None = False
    return_logprob: bool | None = False
    top_logprobs_num: int | None = 0
    rid: str | None = None


# ---- responses -----------------------------------------------------------------------
def _now() -> int:
    return int(time.time())


class _Choice(_Response):
    """What every choice of a reply or a streamed chunk carries."""

    index: int
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class _Envelope(_Response):
    """What every completion reply or chunk carries around its choices."""

    id: str
    created: int = Field(default_factory=_now)
    model: str


class PromptTokensDetails(_Response):
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache instead of being computed."""


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatTopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatChoiceLogprobs(_Response):
    content: list[ChatTokenLogprob] | None


class FunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None
    """JSON text of the arguments (streamed in pieces)."""


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class _ChatChoice(_Choice):
    logprobs: ChatChoiceLogprobs | None = None


class ChatCompletionChoice(_ChatChoice):
    message: ChatResponseMessage


class ChatStreamChoice(_ChatChoice):
    delta: DeltaMessage


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None
    system_fingerprint: str | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "kestrel"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


class GenerateResult(_Response):
    """One completion of POST /generate (a list of them for a batch or n > 1)."""

    text: str
    output_ids: list[int]
    meta_info: dict
    """id, prompt_tokens, completion_tokens, finish_reason (and logprobs when asked for)."""
    index: int | None = None


class HealthResponse(_Response):
    status: str
    """ok, loading, restarting, draining, stalled or dead."""
    detail: str | None = None


class VersionResponse(_Response):
    version: str
